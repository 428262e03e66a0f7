"""The ledger writer while Redis is down: it waits between attempts instead of spinning on a core, and it still
stops when cancelled (redis-py can turn a cancellation that reaches it mid-failure into a connection error).

Redis here is a real TCP server that accepts each connection and closes it at once (what a dying or restarting
Redis looks like to a client); the database is a real SQLite ledger.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from gateway.db.engine import SqlRunner
from gateway.metering.writer import LedgerWriter
from gateway.redis_client import make_redis
from tests.harness import ClosingServer, create_database

FLUSH_INTERVAL = 0.1
ATTEMPTS = 4  # connections seen before judging: a writer retrying at once makes them within milliseconds


async def test_an_unreachable_usage_stream_is_retried_after_a_pause_not_in_a_busy_loop(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    database = create_database("sqlite", tmp_path)
    sql = SqlRunner(database.engine, threads=1)
    server = ClosingServer(ATTEMPTS)
    listener = await asyncio.start_server(server.handle, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    redis = make_redis(f"redis://127.0.0.1:{port}/0", timeout=1.0)
    writer = LedgerWriter(
        sql, tmp_path / "spool", redis=redis, batch_size=100, flush_interval=FLUSH_INTERVAL, claim_idle=30.0
    )
    caplog.set_level(logging.INFO, logger="gateway.metering.writer")
    task = asyncio.create_task(writer.run_forever())
    try:
        async with asyncio.timeout(30):
            await server.enough.wait()
    finally:
        # Cancelled while a connection is failing (the server hangs up on the next one at once): it must end.
        task.cancel()
        done, _ = await asyncio.wait([task], timeout=10)
        listener.close()
        await redis.aclose()
        sql.close()
        database.drop()

    assert done, "the ledger writer outlived its cancellation"
    assert not writer.stream_healthy
    # Each round tries the stream (a connection, and redis-py's one retry), then pauses for the flush interval.
    # Sleeping never ends early, so this lower bound cannot flake; a busy loop fails it by orders of magnitude.
    rounds_apart = (ATTEMPTS - 1) // 2
    assert server.times[-1] - server.times[0] >= rounds_apart * FLUSH_INTERVAL
    warnings = [record for record in caplog.records if "usage stream unavailable" in record.getMessage()]
    assert len(warnings) == 1  # one line for the outage, not one per attempt
    assert str(port) not in warnings[0].getMessage()  # no connection details in the log
