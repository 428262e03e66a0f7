"""The ledger writer: durable buffer → SQL, in batches, idempotently, never on the serving path.

Each gateway process runs one. It drains its local spool (closed segments; a segment is deleted only after its
rows are committed) and, with Redis, reads the usage stream in a consumer group: entries are acknowledged (and
deleted) only after the transaction that inserted them commits; entries left pending by a process that died are
claimed by the others after `metering.claim_idle`. The request id (with its start time) is the conflict key, so a
replayed record never doubles a row, and rollups are updated from exactly the rows the insert returned.

While the database is down, nothing is acknowledged: the buffer grows (exported as the backlog) and the writer
retries with back-off, then drains once the database is back. SQL runs on the SQL thread pool.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections import defaultdict
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
import redis.asyncio as aioredis
import sqlalchemy as sa
from redis.exceptions import RedisError, ResponseError
from sqlalchemy.dialects import postgresql, sqlite

from gateway import metrics
from gateway.db.engine import SqlRunner, as_utc
from gateway.db.schema import ROLLUP_SUMS, api_keys, usage, usage_rollups, usage_tag_rollups
from gateway.metering.buffer import STREAM
from gateway.metering.records import decode
from gateway.metering.spool import Spool, adopt, closed_segments, release, slot_directories
from gateway.redis_client import reraise_cancellation

log = logging.getLogger(__name__)

GROUP = "ledger"
_RETURNED = (
    usage.c.started_at,
    usage.c.team_id,
    usage.c.user_id,
    usage.c.key_id,
    usage.c.model,
    usage.c.tags,
    usage.c.status_code,
    usage.c.prompt_tokens,
    usage.c.cached_prompt_tokens,
    usage.c.completion_tokens,
    usage.c.reasoning_tokens,
    usage.c.cost_nanousd,
)


def _dialect(engine: sa.Engine) -> Any:
    return postgresql if engine.dialect.name == "postgresql" else sqlite


def _buckets(started_at: datetime) -> tuple[tuple[str, datetime], tuple[str, datetime]]:
    hour = started_at.replace(minute=0, second=0, microsecond=0)
    return ("hour", hour), ("day", hour.replace(hour=0))


def rollup_deltas(rows: Sequence[Any]) -> tuple[dict[tuple[Any, ...], list[int]], dict[tuple[Any, ...], list[int]]]:
    """Sums per (granularity, bucket, team, user, key, model) and per (granularity, bucket, team, tag, model)."""
    by_key: dict[tuple[Any, ...], list[int]] = defaultdict(lambda: [0] * len(ROLLUP_SUMS))
    by_tag: dict[tuple[Any, ...], list[int]] = defaultdict(lambda: [0] * len(ROLLUP_SUMS))
    for row in rows:
        sums = (
            1,
            1 if row.status_code >= 400 else 0,
            row.prompt_tokens,
            row.cached_prompt_tokens,
            row.completion_tokens,
            row.reasoning_tokens,
            row.cost_nanousd,
        )
        started_at = as_utc(row.started_at)
        assert started_at is not None
        for granularity, bucket in _buckets(started_at):
            targets = [by_key[(granularity, bucket, row.team_id or 0, row.user_id or 0, row.key_id or "", row.model)]]
            targets += [by_tag[(granularity, bucket, row.team_id or 0, tag, row.model)] for tag in row.tags or ()]
            for target in targets:
                for index, value in enumerate(sums):
                    target[index] += value
    return by_key, by_tag


def _upsert_rollups(
    connection: sa.Connection,
    dialect: Any,
    table: sa.Table,
    deltas: dict[tuple[Any, ...], list[int]],
    dimensions: Sequence[str],
) -> None:
    if not deltas:
        return
    rows = [
        dict(zip(dimensions, key, strict=True)) | dict(zip(ROLLUP_SUMS, sums, strict=True))
        for key, sums in deltas.items()
    ]
    statement = dialect.insert(table)
    statement = statement.on_conflict_do_update(
        index_elements=list(dimensions),
        set_={name: table.c[name] + statement.excluded[name] for name in ROLLUP_SUMS},
    )
    connection.execute(statement, rows)


def insert_rows(engine: sa.Engine, rows: Sequence[dict[str, Any]]) -> int:
    """Insert a batch in one transaction; duplicates are skipped, rollups count only what was inserted.
    Returns the number of rows actually inserted."""
    if not rows:
        return 0
    if engine.dialect.name == "postgresql":
        return _insert_postgres(engine, rows)
    dialect = _dialect(engine)
    statement = (
        dialect.insert(usage).on_conflict_do_nothing(index_elements=["request_id", "started_at"]).returning(*_RETURNED)
    )
    with engine.begin() as connection:
        inserted = connection.execute(statement, list(rows)).all()
        by_key, by_tag = rollup_deltas(inserted)
        _upsert_rollups(
            connection,
            dialect,
            usage_rollups,
            by_key,
            ("granularity", "bucket_start", "team_id", "user_id", "key_id", "model"),
        )
        _upsert_rollups(
            connection, dialect, usage_tag_rollups, by_tag, ("granularity", "bucket_start", "team_id", "tag", "model")
        )
        _touch_keys(connection, rows)
    return len(inserted)


_USAGE_COLUMNS = [column.name for column in usage.columns]
_SUM_UPDATES = ", ".join(f"{name} = {{table}}.{name} + excluded.{name}" for name in ROLLUP_SUMS)
_SUM_SELECT = (
    "count(*), sum(CASE WHEN status_code >= 400 THEN 1 ELSE 0 END), sum(prompt_tokens), sum(cached_prompt_tokens), "
    "sum(completion_tokens), sum(reasoning_tokens), sum(cost_nanousd)"
)


def _rollup_cte(name: str, granularity: str) -> str:
    bucket = f"date_trunc('{granularity}', started_at AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'"
    return f"""{name} AS (
        INSERT INTO usage_rollups (granularity, bucket_start, team_id, user_id, key_id, model, {", ".join(ROLLUP_SUMS)})
        SELECT '{granularity}', {bucket}, coalesce(team_id, 0), coalesce(user_id, 0), coalesce(key_id, ''), model,
               {_SUM_SELECT}
        FROM inserted GROUP BY 2, 3, 4, 5, 6
        ON CONFLICT (granularity, bucket_start, team_id, user_id, key_id, model)
        DO UPDATE SET {_SUM_UPDATES.format(table="usage_rollups")})"""


def _tag_rollup_cte(name: str, granularity: str) -> str:
    bucket = f"date_trunc('{granularity}', started_at AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'"
    return f"""{name} AS (
        INSERT INTO usage_tag_rollups (granularity, bucket_start, team_id, tag, model, {", ".join(ROLLUP_SUMS)})
        SELECT '{granularity}', {bucket}, coalesce(team_id, 0), tag, model, {_SUM_SELECT}
        FROM inserted CROSS JOIN LATERAL json_array_elements_text(inserted.tags) AS tag
        WHERE inserted.tags IS NOT NULL GROUP BY 2, 3, 4, 5
        ON CONFLICT (granularity, bucket_start, team_id, tag, model)
        DO UPDATE SET {_SUM_UPDATES.format(table="usage_tag_rollups")})"""


# One statement: insert what is new, and from exactly those rows update the rollups and the keys' last use.
_POSTGRES_INSERT = f"""
WITH inserted AS (
    INSERT INTO usage SELECT * FROM usage_incoming ON CONFLICT (request_id, started_at) DO NOTHING RETURNING *
),
{_rollup_cte("hourly", "hour")},
{_rollup_cte("daily", "day")},
{_tag_rollup_cte("hourly_tags", "hour")},
{_tag_rollup_cte("daily_tags", "day")},
latest AS (SELECT key_id, max(started_at) AS at FROM inserted WHERE key_id IS NOT NULL GROUP BY key_id),
-- Two writers updating the same keys in different orders would deadlock: lock in key order, skip rows another
-- writer holds (it is setting about the same time anyway).
lockable AS (
    SELECT api_keys.id FROM api_keys JOIN latest ON latest.key_id = api_keys.id
    ORDER BY api_keys.id FOR UPDATE OF api_keys SKIP LOCKED
),
touched AS (
    UPDATE api_keys SET last_used_at = latest.at FROM latest, lockable
    WHERE api_keys.id = latest.key_id AND api_keys.id = lockable.id
      AND (api_keys.last_used_at IS NULL OR api_keys.last_used_at < latest.at)
)
SELECT count(*) FROM inserted
"""


def _insert_postgres(engine: sa.Engine, rows: Sequence[dict[str, Any]]) -> int:
    """COPY the batch into a temporary table, then one statement does the rest: far cheaper than a multi-row
    INSERT with thousands of parameters."""
    with engine.begin() as connection:
        cursor = connection.connection.driver_connection.cursor()  # type: ignore[union-attr]
        cursor.execute("CREATE TEMPORARY TABLE usage_incoming (LIKE usage INCLUDING DEFAULTS) ON COMMIT DROP")
        with cursor.copy(f"COPY usage_incoming ({', '.join(_USAGE_COLUMNS)}) FROM STDIN") as copy:
            for row in rows:
                copy.write_row([_copy_value(name, row.get(name)) for name in _USAGE_COLUMNS])
        cursor.execute(_POSTGRES_INSERT)
        return int(cursor.fetchone()[0])


def _copy_value(name: str, value: Any) -> Any:
    if name == "tags" and value is not None:
        return orjson.dumps(value).decode()
    return value


def _touch_keys(connection: sa.Connection, rows: Sequence[dict[str, Any]]) -> None:
    last_used: dict[str, datetime] = {}
    for row in rows:
        key_id = row["key_id"]
        if key_id is not None and (key_id not in last_used or last_used[key_id] < row["started_at"]):
            last_used[key_id] = row["started_at"]
    if last_used:
        connection.execute(
            api_keys.update()
            .where(api_keys.c.id == sa.bindparam("key"))
            .where(sa.or_(api_keys.c.last_used_at.is_(None), api_keys.c.last_used_at < sa.bindparam("at")))
            .values(last_used_at=sa.bindparam("at")),
            [{"key": key, "at": at} for key, at in last_used.items()],
        )


def _read_segment(path: Path) -> list[dict[str, Any]]:
    return [decode(line) for line in Spool.read(path)]


class LedgerWriter:
    def __init__(
        self,
        sql: SqlRunner,
        spool_base: Path,
        *,
        redis: aioredis.Redis | None,
        batch_size: int,
        flush_interval: float,
        claim_idle: float,
        batch_gap: float = 0.0,
    ) -> None:
        self._sql = sql
        self._spool_base = spool_base
        self._redis = redis
        self._batch_size = batch_size
        self._flush_interval = flush_interval
        self._batch_gap = batch_gap
        self._last_batch_full = False
        self._claim_idle_ms = int(claim_idle * 1000)
        self._consumer = f"{socket.gethostname()}-{os.getpid()}"
        self._group_ready = False
        self._last_claim = 0.0
        self._last_adoption = 0.0
        self.rows_written = 0
        self.database_healthy = True
        self.stream_healthy = True

    async def run_forever(self) -> None:
        backoff = self._flush_interval
        while True:
            try:
                progressed = await self.step()
                if not self.database_healthy:
                    log.info("ledger inserts work again")
                    metrics.DATABASE_UP.set(1)
                self.database_healthy = True
                backoff = self._flush_interval
                if not progressed:
                    # A reachable stream waits inside its blocking read; an unreachable one must not be retried
                    # in a busy loop (a Redis outage would burn a core).
                    idle = self._redis is None or not self.stream_healthy
                    await asyncio.sleep(self._flush_interval if idle else 0)
                elif not self._last_batch_full:
                    # Records are already durable in the buffer: letting a partial batch grow for a moment costs
                    # nothing but freshness, while each transaction costs the same whatever its size.
                    await asyncio.sleep(self._batch_gap)
            except sa.exc.SQLAlchemyError as exc:
                if self.database_healthy:
                    log.warning("ledger insert failed (%s); records stay buffered and are retried", type(exc).__name__)
                self.database_healthy = False
                metrics.DATABASE_UP.set(0)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    async def step(self, *, block: bool = True) -> bool:
        """One round of work; True if anything was written. Not blocking (shutdown): adopt orphans every time."""
        progressed = await self._drain_spool(adopt_now=not block)
        if self._redis is not None:
            progressed = await self._drain_stream(block=block and not progressed) or progressed
        return progressed

    async def _insert(self, rows: Sequence[dict[str, Any]]) -> None:
        self._last_batch_full = len(rows) >= self._batch_size
        started = time.perf_counter()
        inserted = await self._sql.run(insert_rows, self._sql.engine, rows)
        self.rows_written += inserted
        metrics.LEDGER_ROWS.inc(inserted)
        metrics.LEDGER_BATCH_SECONDS.observe(time.perf_counter() - started)

    # --- spool ---

    async def _drain_spool(self, *, adopt_now: bool = False) -> bool:
        """Closed segments of every serving process; now and then, the active segments of processes that died."""
        progressed = False
        adopt_now = adopt_now or time.monotonic() - self._last_adoption >= 2.0
        if adopt_now:
            self._last_adoption = time.monotonic()
        for directory in await asyncio.to_thread(slot_directories, self._spool_base):
            lock = await asyncio.to_thread(adopt, directory) if adopt_now else None
            try:
                progressed = await self._insert_segments(closed_segments(directory)) or progressed
            finally:
                if lock is not None:
                    release(lock)
        return progressed

    async def _insert_segments(self, segments: list[Path]) -> bool:
        for segment in segments:
            records = await asyncio.to_thread(_read_segment, segment)
            for start in range(0, len(records), self._batch_size):
                await self._insert(records[start : start + self._batch_size])
            Spool.delete(segment)
        return bool(segments)

    # --- stream ---

    async def _ensure_group(self) -> None:
        if self._group_ready:
            return
        assert self._redis is not None
        try:
            await self._redis.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._group_ready = True

    async def _drain_stream(self, *, block: bool) -> bool:
        assert self._redis is not None
        try:
            await self._ensure_group()
            entries = await self._claim_abandoned()
            if not entries:
                # Our own unacknowledged entries first (after a failed insert or a restart), then new ones.
                entries = await self._read("0")
            if not entries:
                entries = await self._read(">", block_ms=int(self._flush_interval * 1000) if block else None)
        except (RedisError, OSError) as exc:
            reraise_cancellation(exc)
            self._group_ready = False
            if self.stream_healthy:
                log.warning("usage stream unavailable (%s); retrying, the spool takes new records", type(exc).__name__)
            self.stream_healthy = False
            return False
        if not self.stream_healthy:
            log.info("usage stream reachable again")
            self.stream_healthy = True
        if not entries:
            return False
        ids = [entry_id for entry_id, _ in entries]
        rows = [decode(fields[b"d"]) for _, fields in entries if fields and b"d" in fields]
        await self._insert(rows)
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.xack(STREAM, GROUP, *ids)
                pipe.xdel(STREAM, *ids)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            reraise_cancellation(exc)  # not acknowledged: they will be inserted again, and skipped as duplicates
        return True

    async def _read(self, start: str, block_ms: int | None = None) -> list[tuple[bytes, dict[bytes, bytes]]]:
        assert self._redis is not None
        response: Any = await self._redis.xreadgroup(
            GROUP, self._consumer, {STREAM: start}, count=self._batch_size, block=block_ms
        )
        return list(response[0][1]) if response else []

    async def _claim_abandoned(self) -> list[tuple[bytes, dict[bytes, bytes]]]:
        """Entries another consumer read but never acknowledged for `claim_idle` (it died, or is stuck)."""
        now = time.monotonic()
        if now - self._last_claim < min(5.0, self._claim_idle_ms / 2000):
            return []
        self._last_claim = now
        assert self._redis is not None
        result = await self._redis.xautoclaim(
            STREAM, GROUP, self._consumer, min_idle_time=self._claim_idle_ms, start_id="0-0", count=self._batch_size
        )
        return [(entry_id, fields) for entry_id, fields in result[1] if fields]

    # --- shutdown ---

    async def drain(self, deadline: float) -> None:
        """On SIGTERM: move everything buffered into SQL before exiting, within `deadline` seconds (the serving
        processes have exited by then: their active segments are adopted)."""
        try:
            async with asyncio.timeout(deadline):
                while True:
                    try:
                        if not await self.step(block=False):
                            return
                    except sa.exc.SQLAlchemyError:
                        await asyncio.sleep(0.5)  # the database is down: retry until the deadline
        except TimeoutError:
            log.error(
                "shutdown: buffered usage could not all be written to SQL; it stays in the buffer for the next start"
            )
