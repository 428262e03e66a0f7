"""The admin API while the database is away: a clear 503 the client can retry, never a 500 with a traceback; the
proxy keeps serving from its key cache meanwhile, and the admin API answers again once the database is back."""

from __future__ import annotations

from pathlib import Path

import httpx

from tests.admin.conftest import ADMIN_KEY, client
from tests.admin.test_admin_api import CHAT, assert_openai_error, chat
from tests.harness import Database, MockBackend, gateway_config, make_tenant, start_gateway, wait_for
from tests.tcp_proxy import TcpProxy, via_proxy


def test_admin_calls_get_503_while_the_database_is_down(
    postgres: Database, mock_backend: MockBackend, tmp_path: Path
) -> None:
    proxy = TcpProxy("127.0.0.1", 5432)
    config = gateway_config(via_proxy(postgres.url, proxy), mock_backend.url, **{"admin.keys": [ADMIN_KEY]})
    gateway = start_gateway(tmp_path, config)
    tenant = make_tenant(postgres.engine)
    try:
        wait_for(lambda: chat(gateway, tenant.key).status_code == 200, timeout=10, what="the key to be loaded")
        with client(gateway, ADMIN_KEY) as org:
            assert org.get("/admin/teams").status_code == 200
            proxy.cut()
            refused = org.get("/admin/teams")
            error = assert_openai_error(refused, 503)
            assert error["code"] == "service_unavailable"
            assert refused.headers["retry-after"] == "2"
            assert "127.0.0.1" not in refused.text and "postgres" not in refused.text.lower()
            assert chat(gateway, tenant.key).status_code == 200, "the proxy needs no SQL"
            proxy.restore()
            wait_for(lambda: org.get("/admin/teams").status_code == 200, timeout=15, what="the admin API to recover")
            teams = [row["name"] for row in org.get("/admin/teams").json()["data"]]
            assert tenant.team in teams
        assert httpx.post(f"{gateway.base_url}/chat/completions", json=CHAT).status_code == 401
    finally:
        proxy.restore()
        assert gateway.stop() == 0
        proxy.close()
    log = gateway.log()
    assert "database unavailable: OperationalError" in log
    assert "Traceback" not in log, log[-3000:]
