"""Process plumbing for the benchmark: tools on PATH, free ports, services started and stopped by their group."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType


class BenchError(Exception):
    """The benchmark cannot go on; the message says why."""


def require_tool(name: str, hint: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin:/sbin")
    if path is None:
        raise BenchError(f"`{name}` not found on PATH: {hint}")
    return path


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def http_status(url: str, timeout: float = 1.0) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return None


def wait_until(predicate: Callable[[], bool], *, timeout: float, what: str, alive: Callable[[], bool]) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if not alive():
            raise BenchError(f"{what}: the process exited")
        if time.monotonic() > deadline:
            raise BenchError(f"{what}: not ready after {timeout:.0f}s")
        time.sleep(0.05)


@dataclass
class Service:
    """A child process in its own process group, its output in a log file."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    url: str

    @classmethod
    def start(cls, name: str, command: list[str], *, log_path: Path, url: str, cwd: Path | None = None) -> Service:
        with open(log_path, "wb") as log_file:
            popen = subprocess.Popen(
                command,
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return cls(name=name, popen=popen, log_path=log_path, url=url)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def wait_ready(self, path: str, *, timeout: float = 30.0, successes: int = 1) -> None:
        """Until `path` answers 200 `successes` times in a row (several: every worker behind a shared port)."""
        streak = 0

        def ready() -> bool:
            nonlocal streak
            streak = streak + 1 if http_status(self.url + path) == 200 else 0
            return streak >= successes

        self.wait_for(ready, timeout=timeout, what=f"{self.name} at {self.url}{path}")

    def wait_for(self, ready: Callable[[], bool], *, timeout: float, what: str) -> None:
        """Until `ready()`; on failure the service is stopped and the error carries its log's tail."""
        try:
            wait_until(ready, timeout=timeout, what=what, alive=self.alive)
        except BenchError as exc:
            self.stop()  # the caller never got a ready service to stop
            raise BenchError(f"{exc}\n--- {self.log_path.name} (tail) ---\n{self.log_tail()}") from None

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM to the process group we created, SIGKILL if it lingers."""
        if self.popen.poll() is None:
            _signal_group(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                _signal_group(self.popen.pid, signal.SIGKILL)
                self.popen.wait()
        _signal_group(self.popen.pid, signal.SIGKILL)  # any child the leader left behind


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


# --- memory ----------------------------------------------------------------------------------------------


def children_of(pid: int) -> list[int]:
    """Direct children, from /proc/<pid>/task/*/children, else by scanning PPid in /proc/*/status."""
    found: list[int] = []
    tasks = Path(f"/proc/{pid}/task")
    try:
        for task in tasks.iterdir():
            text = (task / "children").read_text()
            found += [int(item) for item in text.split()]
        return sorted(found)
    except OSError:
        pass
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and _status_field(int(entry.name), "PPid") == str(pid):
            found.append(int(entry.name))
    return sorted(found)


def descendants(pid: int) -> list[int]:
    found: list[int] = []
    pending = children_of(pid)
    while pending:
        child = pending.pop()
        found.append(child)
        pending += children_of(child)
    return sorted(found)


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def _status_field(pid: int, field: str) -> str | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return line.split(":", 1)[1].strip()
    except OSError:
        return None
    return None


def rss_mib(pid: int) -> float | None:
    value = _status_field(pid, "VmRSS")  # "123456 kB"
    return int(value.split()[0]) / 1024 if value else None


@contextlib.contextmanager
def terminate_on_sigterm() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so every cleanup still runs."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
