"""`gateway serve` started while PostgreSQL is unreachable (a host reboot, a deployment during a database outage):
it refuses to start with one line that says why and a distinct exit status, not a traceback."""

from __future__ import annotations

from pathlib import Path

from tests.harness import Database, closed_port, gateway_config, run_cli, write_config
from tests.tcp_proxy import TcpProxy, via_proxy


def test_serve_refuses_to_start_without_the_database_in_one_line(postgres: Database, tmp_path: Path) -> None:
    proxy = TcpProxy("127.0.0.1", 5432)
    try:
        proxy.cut()
        config = gateway_config(via_proxy(postgres.url, proxy), f"http://127.0.0.1:{closed_port()}")
        result = run_cli("serve", config=write_config(tmp_path, config), check=False)
    finally:
        proxy.close()
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("gateway: ")]
    assert len(lines) == 1 and "database is unreachable" in lines[0], result.stderr[-3000:]
