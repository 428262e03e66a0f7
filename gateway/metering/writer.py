"""The ledger writer: usage rows are queued in memory and inserted in batches on the SQL thread pool.

Never on the hot path: `submit` only appends. Inserts are idempotent (the primary key is the conflict key), so
a batch retried after a failure never doubles a row. While the database is down rows stay queued and are
retried with back-off; the queue length is exported as the backlog.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from gateway.db.engine import SqlRunner
from gateway.db.schema import api_keys, usage

log = logging.getLogger(__name__)


def insert_rows(engine: sa.Engine, rows: Sequence[dict[str, Any]]) -> None:
    dialect = postgresql if engine.dialect.name == "postgresql" else sqlite
    statement = dialect.insert(usage).on_conflict_do_nothing(index_elements=["request_id", "started_at"])
    last_used: dict[str, datetime] = {}
    for row in rows:
        key_id = row["key_id"]
        if key_id is not None and (key_id not in last_used or last_used[key_id] < row["started_at"]):
            last_used[key_id] = row["started_at"]
    with engine.begin() as connection:
        connection.execute(statement, list(rows))
        if last_used:
            connection.execute(
                api_keys.update()
                .where(api_keys.c.id == sa.bindparam("key"))
                .where(sa.or_(api_keys.c.last_used_at.is_(None), api_keys.c.last_used_at < sa.bindparam("at")))
                .values(last_used_at=sa.bindparam("at")),
                [{"key": key, "at": at} for key, at in last_used.items()],
            )


class UsageWriter:
    def __init__(self, sql: SqlRunner, *, batch_size: int, flush_interval: float) -> None:
        self._sql = sql
        self._batch_size = batch_size
        self._flush_interval = flush_interval
        self._queue: deque[dict[str, Any]] = deque()
        self._wakeup = asyncio.Event()
        self.rows_written = 0
        self.database_healthy = True

    @property
    def backlog(self) -> int:
        return len(self._queue)

    def submit(self, row: dict[str, Any]) -> None:
        self._queue.append(row)
        if len(self._queue) >= self._batch_size:
            self._wakeup.set()

    async def run_forever(self) -> None:
        backoff = self._flush_interval
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(backoff):
                    await self._wakeup.wait()
            self._wakeup.clear()
            try:
                await self.flush()
                backoff = self._flush_interval
            except sa.exc.SQLAlchemyError as exc:
                backoff = min(max(backoff * 2, 0.5), 10.0)
                log.warning("usage insert failed (%s); %d rows queued, retrying", type(exc).__name__, self.backlog)

    async def flush(self) -> None:
        while self._queue:
            batch = [self._queue[i] for i in range(min(self._batch_size, len(self._queue)))]
            try:
                await self._sql.run(insert_rows, self._sql.engine, batch)
            except sa.exc.SQLAlchemyError:
                self.database_healthy = False
                raise
            self.database_healthy = True
            for _ in batch:
                self._queue.popleft()
            self.rows_written += len(batch)

    async def drain(self, deadline: float) -> None:
        """Flush what is queued, giving up after `deadline` seconds (the rows are then reported as lost)."""
        try:
            async with asyncio.timeout(deadline):
                while self._queue:
                    try:
                        await self.flush()
                    except sa.exc.SQLAlchemyError:
                        await asyncio.sleep(0.5)
        except TimeoutError:
            log.error("shutdown: %d usage rows could not be written to the database", self.backlog)
