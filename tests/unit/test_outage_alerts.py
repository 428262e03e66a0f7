"""Budget alert checks while the database is unreachable: one warning for the outage, not one per check.

The database is a real TCP server on 127.0.0.1 that hangs up on every connection (what PostgreSQL going away looks
like to psycopg); each connection attempt is one check."""

from __future__ import annotations

import asyncio
import logging
from types import SimpleNamespace

import pytest

from gateway.alerts import BudgetAlerter
from gateway.db.engine import SqlRunner, create_engine
from gateway.metering.prices import PriceBook
from gateway.settings import Alerts, Limits
from gateway.snapshot import Snapshot
from tests.harness import ClosingServer

CHECKS = 4


async def test_an_unreachable_database_pauses_alert_checks_with_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    closing = ClosingServer(CHECKS)
    server = await asyncio.start_server(closing.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    sql = SqlRunner(create_engine(f"postgresql://postgres@127.0.0.1:{port}/gone"))
    snapshot = Snapshot(version=1, keys={}, prices=PriceBook({}), overrides={}, drains=frozenset(), loaded_at=0.0)
    state = SimpleNamespace(
        settings=SimpleNamespace(alerts=Alerts(interval=0.05), limits=Limits()),
        snapshot=SimpleNamespace(current=snapshot),
        sql=sql,
    )
    caplog.set_level(logging.INFO, logger="gateway.alerts")
    task = asyncio.create_task(BudgetAlerter(state, None).run_forever())  # type: ignore[arg-type]
    try:
        async with asyncio.timeout(60):
            await closing.enough.wait()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        server.close()
        sql.close()

    messages = [record.getMessage() for record in caplog.records]
    warnings = [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING]
    assert len(warnings) == 1, messages  # for a database gone through CHECKS attempts
    assert "database unavailable" in warnings[0]
    assert not any(record.exc_info for record in caplog.records)  # expected trouble: no traceback
    assert all(str(port) not in message for message in messages)
