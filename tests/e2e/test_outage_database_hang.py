"""PostgreSQL that stops answering (a hung server, a network partition: connections stay open, no error comes), and
SIGTERM meanwhile: SQL blocked on such a connection has no timeout, and the workers and the ledger writer waited for
it before exiting, until the supervisor killed them (grace + 15 s per phase, 35 s here). They must stop within the
grace plus the writer's drain, leaving unwritten usage in the buffer for the next start.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import httpx

from tests.harness import CHAT, Database, MockBackend, gateway_config, make_tenant, start_gateway, wait_for
from tests.tcp_proxy import TcpProxy, via_proxy

GRACE = 2.0
DRAIN = 5.0  # the writer's drain deadline: max(grace, 5 s)


def test_sigterm_while_the_database_hangs_stops_in_time(
    postgres: Database, mock_backend: MockBackend, tmp_path: Path
) -> None:
    proxy = TcpProxy("127.0.0.1", 5432)
    config = gateway_config(via_proxy(postgres.url, proxy), mock_backend.url, **{"server.shutdown_grace": GRACE})
    gateway = start_gateway(tmp_path, config)
    tenant = make_tenant(postgres.engine)
    headers = {"Authorization": f"Bearer {tenant.key}"}
    body = {"model": "mock-small", "messages": CHAT, "max_tokens": 5}
    try:
        wait_for(
            lambda: httpx.post(f"{gateway.base_url}/chat/completions", headers=headers, json=body).status_code == 200,
            what="the key",
        )
        proxy.freeze()
        # Served from memory meanwhile; its usage waits in the spool (the writer's insert hangs on the database).
        response = httpx.post(f"{gateway.base_url}/chat/completions", headers=headers, json=body, timeout=10)
        assert response.status_code == 200

        started = time.monotonic()
        gateway.process.popen.send_signal(signal.SIGTERM)
        code = gateway.process.popen.wait(60)
        elapsed = time.monotonic() - started
    finally:
        gateway.stop()
        proxy.close()
    assert code == 0
    assert elapsed < GRACE + DRAIN + 5, f"stopped after {elapsed:.1f} s"
    assert "Traceback" not in gateway.log(), gateway.log()[-3000:]


def test_a_hanging_database_is_reported_down_then_up_again(
    postgres: Database, mock_backend: MockBackend, tmp_path: Path
) -> None:
    proxy = TcpProxy("127.0.0.1", 5432)
    gateway = start_gateway(tmp_path, gateway_config(via_proxy(postgres.url, proxy), mock_backend.url))
    try:
        wait_for(lambda: httpx.get(f"{gateway.url}/ready").json()["database"] == "up", what="the database up")
        proxy.freeze()
        # The poll waits on the database with no error coming: only its own time limit can tell.
        wait_for(lambda: httpx.get(f"{gateway.url}/ready").json()["database"] == "down", timeout=20, what="down")
        assert httpx.get(f"{gateway.url}/ready").status_code == 200  # keys still served from memory
        proxy.restore()
        wait_for(lambda: httpx.get(f"{gateway.url}/ready").json()["database"] == "up", timeout=20, what="up again")
    finally:
        gateway.stop()
        proxy.close()
    assert "Traceback" not in gateway.log(), gateway.log()[-3000:]
