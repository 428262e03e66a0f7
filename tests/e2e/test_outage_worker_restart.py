"""A serving worker that dies during a PostgreSQL outage (OOM kill, crash) is restarted by the supervisor. It cannot
load its key snapshot until the database is back: it must wait for it, not exit and be restarted in a loop (each
start costs a core for a second or two, and left a traceback in the log every time), and start serving by itself
once the database returns. The database outage is a cut through a TCP proxy; the other worker keeps serving.
And a restarted worker told to reload while it starts reloads once it serves (outage or not).
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

from tests.harness import (
    CHAT,
    Database,
    Gateway,
    MockBackend,
    Tenant,
    closed_port,
    descendants,
    gateway_config,
    make_tenant,
    start_gateway,
    wait_for,
)
from tests.tcp_proxy import TcpProxy, via_proxy

WAITING = "waiting for the database before serving"
RESTARTS = "exited with"
GRACE = 2.0


@dataclass
class Outage:
    gateway: Gateway
    proxy: TcpProxy
    tenant: Tenant


@pytest.fixture
def outage(postgres: Database, mock_backend: MockBackend, tmp_path: Path) -> Iterator[Outage]:
    proxy = TcpProxy("127.0.0.1", 5432)
    config = gateway_config(
        via_proxy(postgres.url, proxy),
        mock_backend.url,
        **{"listen.port": closed_port(), "server.shutdown_grace": GRACE},
    )
    gateway = start_gateway(tmp_path, config, "--workers", "2")
    tenant = make_tenant(postgres.engine)
    try:
        wait_for(lambda: all(chat(gateway, tenant).status_code == 200 for _ in range(4)), what="the key")
        wait_for(lambda: workers_serving(gateway) == 2, what="both workers to serve")
        yield Outage(gateway, proxy, tenant)
    finally:
        gateway.stop()
        proxy.close()


def chat(gateway: Gateway, tenant: Tenant) -> httpx.Response:
    return httpx.post(
        f"{gateway.base_url}/chat/completions",
        headers={"Authorization": f"Bearer {tenant.key}"},
        json={"model": "mock-small", "messages": CHAT, "max_tokens": 5},
        timeout=10,
    )


def worker(gateway: Gateway, index: int) -> int | None:
    for pid in descendants(gateway.process.popen.pid):
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"--worker-process" in command and command[command.index(b"--worker-process") + 1] == str(index).encode():
            return pid
    return None


def kill_a_worker_during_the_outage(outage: Outage, *, while_it_starts: int | None = None) -> None:
    """`while_it_starts`: a signal for the supervisor as soon as the replacement process exists."""
    gateway = outage.gateway
    outage.proxy.cut()
    wait_for(lambda: httpx.get(f"{gateway.url}/ready").json()["database"] == "down", what="the outage to be seen")
    victim = worker(gateway, 0)
    assert victim is not None
    # A worker that was still starting when the database went away waits for it too: only a wait logged after
    # the kill is the replacement's.
    waits_before = gateway.log().count(WAITING)
    os.kill(victim, signal.SIGKILL)
    if while_it_starts is not None:
        wait_for(lambda: worker(gateway, 0) not in (None, victim), what="the replacement worker")
        gateway.process.popen.send_signal(while_it_starts)
    # Its replacement either waits for the database or (the bug) fails to start and is restarted.
    wait_for(
        lambda: gateway.log().count(WAITING) > waits_before or gateway.log().count(RESTARTS) > 1,
        timeout=30,
        what="the restarted worker to wait for the database or fail",
    )
    assert gateway.log().count(RESTARTS) == 1, gateway.log()[-3000:]


def test_a_worker_restarted_during_a_database_outage_waits_for_it_then_serves(outage: Outage) -> None:
    gateway = outage.gateway
    kill_a_worker_during_the_outage(outage)
    assert chat(gateway, outage.tenant).status_code == 200  # the other worker serves from its snapshot meanwhile

    waiting = worker(gateway, 0)
    assert waiting is not None
    port = int(gateway.url.rsplit(":", 1)[1])
    assert not listens(waiting, port)  # no connection reaches a worker without keys
    assert workers_serving(gateway) == 1

    outage.proxy.restore()
    wait_for(lambda: listens(waiting, port), timeout=30, what="the restarted worker to serve")
    assert worker(gateway, 0) == waiting  # the same process: it waited instead of being restarted
    assert workers_serving(gateway) == 2
    assert gateway.log().count(RESTARTS) == 1
    assert "Traceback" not in gateway.log(), gateway.log()[-3000:]


def workers_serving(gateway: Gateway) -> float:
    for line in httpx.get(f"{gateway.url}/metrics").text.splitlines():
        if line.startswith("gateway_workers "):
            return float(line.split()[1])
    raise AssertionError("no gateway_workers in /metrics")


def listens(pid: int, port: int) -> bool:
    """Whether process `pid` holds a socket listening on `port` (each worker has its own, SO_REUSEPORT)."""
    listening = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
            listening.add(f"socket:[{fields[9]}]")
    try:
        descriptors = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return False
    for descriptor in descriptors:
        try:
            if os.readlink(descriptor) in listening:
                return True
        except OSError:
            continue
    return False


def test_sigterm_stops_a_worker_that_waits_for_the_database(outage: Outage) -> None:
    gateway = outage.gateway
    kill_a_worker_during_the_outage(outage)

    started = time.monotonic()
    gateway.process.popen.send_signal(signal.SIGTERM)
    code = gateway.process.popen.wait(GRACE + 15)
    assert code == 0
    # The workers' grace, then the writer's drain (which gives up on the database after max(grace, 5 s)).
    assert time.monotonic() - started < GRACE + 5 + 5  # the supervisor would SIGKILL at GRACE + 15
    assert "Traceback" not in gateway.log(), gateway.log()[-3000:]


def reloads(gateway: Gateway) -> int:
    return gateway.log().count("configuration reloaded")


def test_sighup_kills_no_worker_that_starts_or_waits_for_the_database(outage: Outage) -> None:
    gateway = outage.gateway
    # SIGHUP (forwarded to every worker) while the replacement is starting, then while it waits for the database.
    kill_a_worker_during_the_outage(outage, while_it_starts=signal.SIGHUP)
    waiting = worker(gateway, 0)
    assert waiting is not None
    gateway.process.popen.send_signal(signal.SIGHUP)
    # Each reload also tries to write the prices, on SQL threads shared with the key poller: during the outage a
    # connection attempt may take up to its connect_timeout (5 s) to fail, and the reloads queue behind them.
    wait_for(lambda: reloads(gateway) == 2, timeout=30, what="the serving worker to reload twice")

    outage.proxy.restore()
    port = int(gateway.url.rsplit(":", 1)[1])
    wait_for(lambda: listens(waiting, port), timeout=30, what="the waiting worker to serve")
    # It reloads too once it serves (once: the signal may have come after it read the configuration).
    wait_for(lambda: reloads(gateway) == 3, what="the waiting worker to reload")
    assert worker(gateway, 0) == waiting
    assert gateway.log().count(RESTARTS) == 1, gateway.log()[-3000:]
    assert "Traceback" not in gateway.log(), gateway.log()[-3000:]


def test_a_sighup_that_reaches_a_worker_while_it_starts_is_not_lost(
    postgres: Database, mock_backend: MockBackend, tmp_path: Path
) -> None:
    """No outage here: a worker restarted by the supervisor is told to reload while it is still starting up (before
    its handler exists); it must not die of it, nor drop it, since the file may have changed after it read it."""
    config = gateway_config(postgres.url, mock_backend.url, **{"listen.port": closed_port()})
    gateway = start_gateway(tmp_path, config, "--workers", "2")
    try:
        victim = worker(gateway, 0)
        assert victim is not None
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: worker(gateway, 0) not in (None, victim), interval=0.002, what="the replacement worker")
        replacement = worker(gateway, 0)
        assert replacement is not None
        config["models"]["mock-added"] = {"deployments": [{"name": "mock-added", "base_url": mock_backend.url}]}
        gateway.config_path.write_text(yaml.safe_dump(config))
        os.kill(replacement, signal.SIGHUP)  # at once: it is still starting the interpreter and importing

        wait_for(lambda: "configuration reloaded" in gateway.log(), timeout=30, what="the replacement to reload")
        assert reloads(gateway) == 1  # the other worker was not told
        assert worker(gateway, 0) == replacement
        assert gateway.log().count(RESTARTS) == 1, gateway.log()[-3000:]
        assert "Traceback" not in gateway.log(), gateway.log()[-3000:]
    finally:
        gateway.stop()
