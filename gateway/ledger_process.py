"""The ledger writer process: moves usage records from the durable buffer (Redis stream, spool files) into SQL.

It runs beside the serving processes, never inside them: its SQL work (and the Python work of building batches)
would otherwise compete with request handling for the event loop and the GIL. `gateway serve` starts one per
host (and restarts it if it dies); `gateway ledger-writer` runs one by hand. Several writers, on one host or many,
share the work through the stream's consumer group; records are inserted idempotently, so overlap is harmless.
On SIGTERM it drains what is buffered (within `server.shutdown_grace`) and exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

import sqlalchemy as sa

from gateway.db.engine import SqlRunner, create_engine
from gateway.db.partitions import ensure_partitions
from gateway.metering.spool import spool_base
from gateway.metering.writer import LedgerWriter
from gateway.redis_client import make_redis
from gateway.settings import Settings

log = logging.getLogger(__name__)


def run_ledger_writer(settings: Settings) -> None:
    from gateway.serve import new_event_loop

    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        runner.run(_main(settings))


def _keep_partitions(engine: sa.Engine) -> None:
    with engine.begin() as connection:
        ensure_partitions(connection)


async def _maintain_forever(sql: SqlRunner) -> None:
    """Monthly ledger partitions are created ahead of time (PostgreSQL); checked hourly."""
    while True:
        with contextlib.suppress(sa.exc.SQLAlchemyError):
            await sql.run(_keep_partitions, sql.engine)
        await asyncio.sleep(3600)


async def _main(settings: Settings) -> None:
    metering = settings.metering
    sql = SqlRunner(create_engine(settings.database.url, pool_size=2), threads=1)
    client = None
    if settings.redis.url:
        client = make_redis(settings.redis.url, timeout=5.0, connect_timeout=settings.redis.timeout)
    writer = LedgerWriter(
        sql,
        spool_base(metering.spool_dir, settings.database.url),
        redis=client,
        batch_size=metering.batch_size,
        flush_interval=metering.flush_interval,
        batch_gap=metering.batch_gap,
        claim_idle=metering.claim_idle,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: None)  # the configuration it uses does not reload
    tasks = [
        asyncio.create_task(writer.run_forever(), name="ledger-writer"),
        asyncio.create_task(_maintain_forever(sql), name="partitions"),
    ]
    log.info("ledger writer running", extra={"redis": client is not None, "spool": metering.spool_dir})
    await stop.wait()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await writer.drain(deadline=max(settings.server.shutdown_grace, 5.0))
    if client is not None:
        await client.aclose()
    await asyncio.to_thread(sql.close)
    log.info("ledger writer stopped", extra={"rows_written": writer.rows_written})
