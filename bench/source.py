"""Which gateway source is measured: the working tree, or a committed revision (`--ref`).

With `--ref REV` the revision is exported (`git archive`) to a temp dir and the benchmark runs again in a child
process whose `PYTHONPATH` and working directory point there, so the harness (migrations, key creation) and the
gateway processes both use that revision's code. The working tree may be mid-edit; a commit is not.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from procs import BenchError

REPO = Path(__file__).resolve().parents[1]
_ROOT_ENV = "BENCH_SOURCE_ROOT"
_LABEL_ENV = "BENCH_SOURCE_LABEL"


def source_root() -> Path:
    """Where `python -m gateway` and `python -m backends.mock` run from (their cwd comes first on sys.path)."""
    return Path(os.environ.get(_ROOT_ENV) or REPO)


def source_label() -> str | None:
    return os.environ.get(_LABEL_ENV)


def _git(*args: str) -> str:
    completed = subprocess.run(["git", *args], capture_output=True, text=True, cwd=REPO)
    if completed.returncode != 0:
        raise BenchError(f"git {' '.join(args)}: {completed.stderr.strip()}")
    return completed.stdout.strip()


def _without_ref(argv: Sequence[str]) -> list[str]:
    kept: list[str] = []
    skip = False
    for item in argv:
        if skip:
            skip = False
        elif item == "--ref":
            skip = True
        elif not item.startswith("--ref="):
            kept.append(item)
    return kept


@contextlib.contextmanager
def exported(ref: str) -> Iterator[tuple[str, Path]]:
    """`ref`'s commit and a clean export of it in a temp dir, removed afterwards."""
    commit = _git("rev-parse", "--verify", f"{ref}^{{commit}}")
    with tempfile.TemporaryDirectory(prefix="gw-bench-src-") as tmp:
        archive = Path(tmp) / "src.tar"
        with open(archive, "wb") as handle:
            subprocess.run(["git", "archive", "--format=tar", commit], stdout=handle, cwd=REPO, check=True)
        root = Path(tmp) / "src"
        with tarfile.open(archive) as tar:
            tar.extractall(root, filter="data")
        yield commit, root


def run_at_ref(ref: str, argv: Sequence[str]) -> int:
    """Export `ref` and run this benchmark against it in a child process; returns the child's exit status."""
    with exported(ref) as (commit, root):
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])),
            _ROOT_ENV: str(root),
            _LABEL_ENV: f"{commit[:7]} (--ref {ref}, clean export)",
        }
        command = [sys.executable, str(Path(__file__).with_name("run.py")), *_without_ref(argv)]
        child = subprocess.Popen(command, env=env)
        try:
            return child.wait()
        except BaseException:
            child.terminate()  # the child cleans up after itself on SIGTERM
            child.wait(60)
            raise
