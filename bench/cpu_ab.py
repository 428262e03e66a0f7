"""Two gateway revisions side by side: worker CPU per request of each, under the same load at the same time.

    .venv/bin/python bench/cpu_ab.py --ref A_REV [--b-ref B_REV] [--limits] [--stream] [--rounds 5]
                                    [--seconds 10] [--set SECTION.KEY=YAML]

Measuring one revision after the other (`cpu_per_request.py` twice) mixes the change with the machine's drift,
which on this VM is several percent from one minute to the next. Here `--ref` (exported clean) and the working
tree (or `--b-ref`) run at once, each with its own PostgreSQL ledger, Redis database and 1,000 keys, each loaded
by its own wrk (half the connections each) against the same nginx: both see the same minute. Prints each round's
worker CPU per request, requests per second and p99 latency, their medians, and B - A per round.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from subprocess import PIPE

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gateway_setup
import nginx_backend
from cpu_per_request import (
    BODY,
    ROOT,
    cpu_seconds,
    gateway_config,
    gateway_url,
    start_gateway,
    wrk_command,
    wrk_result,
)
from procs import free_port, terminate_on_sigterm
from source import exported

PEPPER = "bench-pepper-" + "x" * 24


def _source_b(ref: str | None) -> contextlib.AbstractContextManager[tuple[str, Path]]:
    return exported(ref) if ref else contextlib.nullcontext(("working tree", ROOT))


def _stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    process.wait(60)


def _start(args: argparse.Namespace, stack: contextlib.ExitStack) -> list[tuple[str, str, Path, int]]:
    """nginx, one Redis server and both gateways, each taken down by `stack` (also on SIGTERM or Ctrl-C, whatever
    fails meanwhile); returns per gateway its label, URL, keys file and worker pid."""
    tmp = Path(tempfile.mkdtemp(prefix="cpu-ab-"))
    stack.callback(shutil.rmtree, tmp, ignore_errors=True)
    nginx = nginx_backend.start_nginx(tmp)
    stack.callback(nginx.stop)
    redis_port = free_port()
    command = ["redis-server", "--port", str(redis_port), "--save", "", "--appendonly", "no"]
    stack.callback(_stop, subprocess.Popen(command, stdout=subprocess.DEVNULL))
    commit, source_a = stack.enter_context(exported(args.ref))
    b_name, source_b = stack.enter_context(_source_b(args.b_ref))
    upstream = nginx.url + ("/stream" if args.stream else "")
    targets = []
    for label, source, redis_db in ((f"A {commit[:7]}", source_a, 1), (f"B {b_name[:12]}", source_b, 2)):
        database = stack.enter_context(gateway_setup.fresh_database(args.postgres_url))
        directory = tmp / label.split()[0]
        directory.mkdir()
        keys = directory / "keys"
        keys.write_text("\n".join(gateway_setup.create_keys(database, PEPPER, 1000)))
        config = gateway_config(
            database=database,
            pepper=PEPPER,
            upstream=upstream,
            spool_dir=directory / "spool",
            redis_url=f"redis://127.0.0.1:{redis_port}/{redis_db}",
            limits=args.limits,
            overrides=args.set,
        )
        gateway, worker, _ = start_gateway(config, directory, source)
        stack.callback(_stop, gateway)  # before its database is dropped: callbacks run last in, first out
        targets.append((label, gateway_url(config), keys, worker))
    return targets


def _measure(
    args: argparse.Namespace, targets: list[tuple[str, str, Path, int]], body: Path
) -> dict[str, list[tuple[float, float, float]]]:
    """Per gateway and round: worker CPU µs per request, requests per second, p99 latency in ms."""
    rows: dict[str, list[tuple[float, float, float]]] = {label: [] for label, *_ in targets}
    for round_number in range(1, args.rounds + 1):
        before = {worker: cpu_seconds(worker) for *_, worker in targets}
        commands = [wrk_command(url, keys, body, args.seconds, args.connections // 2, 1) for _, url, keys, _ in targets]
        loads = [subprocess.Popen(command, stdout=PIPE, text=True) for command in commands]
        results = [wrk_result(load.communicate()[0]) for load in loads]
        for (label, _, _, worker), result in zip(targets, results, strict=True):
            requests = int(result["requests"])  # type: ignore[call-overload]
            cpu = (cpu_seconds(worker) - before[worker]) / requests * 1e6
            p99 = result["latency_us"]["p99"] / 1000  # type: ignore[index]
            rows[label].append((cpu, float(result["rps"]), p99))  # type: ignore[arg-type]
            rate = f"{result['rps']:7.0f} req/s"
            print(f"round {round_number}  {label:16} {cpu:6.0f} µs/request  {rate}  p99 {p99:6.2f} ms")
    return rows


def _report(rows: dict[str, list[tuple[float, float, float]]]) -> None:
    print()
    medians = {label: statistics.median(cpu for cpu, _, _ in values) for label, values in rows.items()}
    for label, values in rows.items():
        rps = statistics.median(rate for _, rate, _ in values)
        p99 = statistics.median(p99 for _, _, p99 in values)
        print(f"median  {label:16} {medians[label]:6.0f} µs/request  {rps:7.0f} req/s  p99 {p99:6.2f} ms")
    (a, b) = medians.values()
    pairs = [b_row[0] - a_row[0] for a_row, b_row in zip(*rows.values(), strict=True)]
    per_round = ", ".join(f"{difference:+.0f}" for difference in pairs)
    print(f"B - A: {b - a:+.0f} µs/request ({(b - a) / a:+.1%}); per round: {per_round}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ref", required=True, help="the revision to compare the working tree with (A)")
    parser.add_argument("--b-ref", help="a revision instead of the working tree (B)")
    parser.add_argument("--limits", action="store_true", help="team and key limits on (never reached)")
    parser.add_argument("--stream", action="store_true", help="whole canned SSE streams instead of chat answers")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=32, help="in all: half for each gateway")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=YAML")
    parser.add_argument("--postgres-url", default="postgresql://postgres@127.0.0.1:5432/test")
    args = parser.parse_args()
    with terminate_on_sigterm(), contextlib.ExitStack() as stack:
        body = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="cpu-ab-body-"))) / "body.json"
        body.write_text(json.dumps({**BODY, "stream": True} if args.stream else BODY))
        _report(_measure(args, _start(args, stack), body))


if __name__ == "__main__":
    main()
