"""Summarise a py-spy raw profile (`py-spy record -f raw`): where one thread's time goes.

    .venv/bin/python bench/profile_summary.py PROFILE [--top 40] [--thread-contains Runner.run]

Prints the share of samples by innermost function (self) and by any function on the stack (total), for the
stacks that contain `--thread-contains` (default: the event loop thread).
"""

from __future__ import annotations

import argparse
from collections import Counter


def summarise(path: str, top: int, contains: str) -> None:
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    samples = 0
    with open(path) as handle:
        for line in handle:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if contains not in stack:
                continue
            weight = int(count)
            samples += weight
            frames = stack.split(";")
            for frame in set(frames):
                total[frame.split(" (")[0]] += weight
            own[frames[-1][:120]] += weight
    print(f"{samples} samples in stacks containing {contains!r}\n\nself:")
    for frame, weight in own.most_common(top):
        print(f"{weight / samples * 100:5.1f}%  {frame}")
    print("\ntotal:")
    for frame, weight in total.most_common(top):
        print(f"{weight / samples * 100:5.1f}%  {frame}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("profile")
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--thread-contains", default="Runner.run")
    args = parser.parse_args()
    summarise(args.profile, args.top, args.thread_contains)


if __name__ == "__main__":
    main()
