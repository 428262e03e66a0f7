"""Real vLLM CPU workers for the `vllm` tier: start, readiness, `/metrics`, and a stop that leaves no process.

Each worker runs in a process group (and session) of its own, with ``PR_SET_PDEATHSIG`` so that it dies with
the test process even when that is killed outright; every process of its tree also carries a ``TMPDIR`` unique
to the worker, which :func:`leftover_pids` looks for to prove that a stop left nothing behind.

The metrics helpers are what a load-aware routing test needs: :func:`read_gauges` reads the three gauges a
router weighs (running and waiting requests, KV-cache use), :func:`read_metrics` every ``vllm:`` sample summed
by name; :func:`routing_view` is what a gateway in front of the workers makes of them.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import orjson

from backends.vllm.launch_cpu_worker import available_cpus, worker_command, worker_env
from tests.harness import Gateway, closed_port

#: The served model name of the tier's workers (the gateway's public name too: no chunk needs rewriting).
MODEL = "tiny-llama"
#: The gauges a load-aware router reads.
ROUTING_GAUGES = ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc")

#: The org admin key and the deployment name of the ``vllm_pool_gateway`` fixture (one deployment, both workers).
POOL_ADMIN_KEY = "vllm-pool-admin-key-0123456789abcdef"
POOL_DEPLOYMENT = "vllm-pool"

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{.*\})?\s+(\S+)(?:\s+-?\d+)?$")
_PR_SET_PDEATHSIG = 1


def parse_metrics(text: str, prefix: str = "vllm:") -> dict[str, float]:
    """Prometheus text → ``{name: value}``, samples of the same name (label sets) summed; ``*_created`` and
    histogram buckets left out."""
    totals: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE.match(line)
        if match is None:
            continue
        name = match.group(1)
        if not name.startswith(prefix) or name.endswith(("_created", "_bucket")):
            continue
        totals[name] = totals.get(name, 0.0) + float(match.group(3))
    return totals


def read_metrics(url: str, timeout: float = 5.0) -> dict[str, float]:
    """Every ``vllm:`` metric of the worker at ``url`` (``http://host:port``), summed over label sets."""
    response = httpx.get(f"{url}/metrics", timeout=timeout)
    response.raise_for_status()
    return parse_metrics(response.text)


def read_gauges(url: str, timeout: float = 5.0) -> dict[str, float]:
    """``vllm:num_requests_running``, ``vllm:num_requests_waiting`` and ``vllm:kv_cache_usage_perc``."""
    metrics = read_metrics(url, timeout)
    return {name: metrics[name] for name in ROUTING_GAUGES}


def open_requests(url: str, count: int, *, prompt: str, max_tokens: int) -> list[socket.socket]:
    """``count`` non-streaming completions of exactly ``max_tokens`` tokens sent straight to the worker at
    ``url`` on raw connections, left open and unread: they cost the caller nothing while the worker runs or
    queues them. Closing a connection is a hang-up, which aborts its request (running or waiting)."""
    address = urlsplit(url)
    body = orjson.dumps({"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True})
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: {address.netloc}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    connections = []
    try:
        for _ in range(count):
            connection = socket.create_connection((address.hostname, address.port), timeout=10)
            connections.append(connection)
            connection.sendall(head + body)
    except BaseException:
        close_all(connections)
        raise
    return connections


def close_all(connections: Sequence[socket.socket]) -> None:
    for connection in connections:
        with contextlib.suppress(OSError):
            connection.close()


def routing_view(gateway: Gateway, deployment: str = POOL_DEPLOYMENT) -> dict[str, dict[str, Any]]:
    """The gateway's view of each worker of ``deployment`` (``GET /admin/deployments``), by base URL: ``waiting``,
    ``running``, ``kv_cache_usage`` as last scraped, ``sent_since_scrape``, ``outstanding``, ``expected_load``."""
    response = httpx.get(
        f"{gateway.url}/admin/deployments", headers={"Authorization": f"Bearer {POOL_ADMIN_KEY}"}, timeout=5
    )
    response.raise_for_status()
    (found,) = [item for item in response.json()["data"] if item["name"] == deployment]
    return {endpoint["base_url"]: endpoint for endpoint in found["endpoints"]}


def _die_with_parent() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _child_setup(cpu: int | None) -> Callable[[], None]:
    """What runs in the worker's process between fork and exec: die with us, and keep to core ``cpu``.

    vLLM pins only its compute threads (``VLLM_CPU_OMP_THREADS_BIND``); its engine-core process busy-waits on
    them while they generate, on whatever core it finds. On a small machine a generating worker then takes every
    core, and the gateway, the other worker and the tests stall for seconds at a time (a 0.2 s sleep took 1.6 s,
    a /metrics read 5 s). Pinning the worker's whole process tree to its own core keeps that load there."""

    def setup() -> None:
        _die_with_parent()
        if cpu is not None:
            with contextlib.suppress(OSError, AttributeError):
                os.sched_setaffinity(0, {cpu})

    return setup


@dataclass
class VllmWorker:
    name: str
    port: int
    popen: subprocess.Popen[bytes]
    log_path: Path
    state_dir: Path
    started_at: float = field(default_factory=time.monotonic)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def metrics(self) -> dict[str, float]:
        return read_metrics(self.url)

    def gauges(self) -> dict[str, float]:
        return read_gauges(self.url)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def healthy(self) -> bool:
        try:
            return httpx.get(f"{self.url}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM to the whole process group, then SIGKILL to whatever is left after ``timeout``."""
        pgid = self.popen.pid  # start_new_session: the leader's pid is the group's id
        _signal_group(pgid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and _group_alive(pgid):
            self.popen.poll()  # reap the leader, or it stays a zombie member of the group
            time.sleep(0.1)
        if _group_alive(pgid):
            _signal_group(pgid, signal.SIGKILL)
        try:
            self.popen.wait(10)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()
        _wait(lambda: not _group_alive(pgid), 10)
        for pid in leftover_pids(self.state_dir):  # a process that left the group (none should)
            _kill(pid)


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # Zombies still count for killpg; a group whose only members are zombies is dead for us.
    return any(_state(pid) not in ("Z", "X", None) for pid in _pids_in_group(pgid))


def _pids() -> list[int]:
    return [int(entry) for entry in os.listdir("/proc") if entry.isdigit()]


def _state(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rsplit(b")", 1)[1].split()[0].decode()
    except (OSError, IndexError):
        return None


def _pids_in_group(pgid: int) -> list[int]:
    found = []
    for pid in _pids():
        try:
            if os.getpgid(pid) == pgid:
                found.append(pid)
        except OSError:
            continue
    return found


def leftover_pids(state_dir: Path) -> list[int]:
    """Live processes started for the worker whose state lives in ``state_dir`` (found by their TMPDIR)."""
    needle = f"TMPDIR={state_dir / 'tmp'}".encode()
    found = []
    for pid in _pids():
        if pid == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as environ:
                if needle not in environ.read().split(b"\0"):
                    continue
        except OSError:
            continue
        if _state(pid) not in ("Z", "X", None):
            found.append(pid)
    return found


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def _wait(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def start_worker(
    venv: Path,
    model: Path,
    name: str,
    root: Path,
    *,
    cpu: int | None = None,
    served_model_name: str = MODEL,
    max_num_seqs: int = 2,
    extra: Sequence[str] = (),
) -> VllmWorker:
    """Start one worker (not waiting for it); its log and state go under ``root/name``."""
    state_dir = root / name
    state_dir.mkdir(parents=True, exist_ok=True)
    port = closed_port()
    log_path = state_dir / "worker.log"
    command = worker_command(
        venv, model, port, served_model_name=served_model_name, max_num_seqs=max_num_seqs, extra=extra
    )
    with open(log_path, "ab") as log:
        popen = subprocess.Popen(
            command,
            env=worker_env(venv, state_dir, cpu=cpu),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=state_dir,
            start_new_session=True,
            preexec_fn=_child_setup(cpu),
        )
    return VllmWorker(name=name, port=port, popen=popen, log_path=log_path, state_dir=state_dir)


def wait_ready(workers: Sequence[VllmWorker], timeout: float) -> None:
    """Until every worker answers ``/health`` 200; a worker that exits first fails at once, with its log."""
    deadline = time.monotonic() + timeout
    pending = list(workers)
    while pending:
        for worker in list(pending):
            if worker.popen.poll() is not None:
                raise RuntimeError(
                    f"vLLM worker {worker.name} exited with {worker.popen.returncode} before it was ready; "
                    f"log {worker.log_path}:\n{worker.log()[-6000:]}"
                )
            if worker.healthy():
                pending.remove(worker)
        if pending and time.monotonic() > deadline:
            tails = "\n".join(f"--- {w.name} ({w.log_path}):\n{w.log()[-4000:]}" for w in pending)
            raise RuntimeError(f"vLLM workers not healthy after {timeout:.0f}s:\n{tails}")
        if pending:
            time.sleep(0.25)


def start_workers(
    venv: Path,
    model: Path,
    root: Path,
    count: int = 2,
    *,
    ready_timeout: float = 480.0,  # a cold first start (empty caches, busy machine) has taken over 4 minutes
    served_model_name: str = MODEL,
    max_num_seqs: int = 2,
) -> list[VllmWorker]:
    """Start ``count`` workers at once (compute threads spread over the cores) and wait until all are ready.

    A worker whose port was taken in the meantime (the port is chosen before vLLM binds it) is restarted on
    another port, once.
    """
    cpus = available_cpus()

    def launch(name: str, index: int) -> VllmWorker:
        return start_worker(
            venv,
            model,
            name,
            root,
            cpu=cpus[index % len(cpus)],
            served_model_name=served_model_name,
            max_num_seqs=max_num_seqs,
        )

    names = [chr(ord("a") + index) for index in range(count)]
    workers = [launch(name, index) for index, name in enumerate(names)]
    try:
        try:
            wait_ready(workers, ready_timeout)
        except RuntimeError:
            retried = False
            for index, worker in enumerate(workers):
                if worker.popen.poll() is not None and "Address already in use" in worker.log():
                    worker.stop()
                    workers[index] = launch(worker.name + "-retry", index)
                    retried = True
            if not retried:
                raise
            wait_ready(workers, ready_timeout)
    except BaseException:
        for worker in workers:
            worker.stop(timeout=5)
        raise
    return workers
