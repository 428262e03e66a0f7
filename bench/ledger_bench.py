"""Ledger benchmarks on PostgreSQL: the writer's sustained insert rate, and report queries over a large ledger.

    .venv/bin/python bench/ledger_bench.py [--insert-rows 200000] [--batch 500] [--ledger-rows 10000000]

Creates (and drops) its own database on postgresql://postgres@127.0.0.1:5432. The insert benchmark goes through
`gateway.metering.writer.insert_rows`, exactly what the writer runs (idempotent insert + rollup upserts in one
transaction per batch). The report benchmark fills the ledger with `--ledger-rows` rows spread over three months
with SQL (`generate_series`), builds their rollups, and times the reports a dashboard or `gateway usage report`
runs for one team and one month.
"""

from __future__ import annotations

import argparse
import secrets
import statistics
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gateway.db import migrate
from gateway.db.engine import create_engine
from gateway.db.partitions import ensure_month_partition
from gateway.metering.reports import usage_report
from gateway.metering.writer import insert_rows

ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/test"


def make_rows(count: int, start: datetime) -> list[dict[str, Any]]:
    rows = []
    for index in range(count):
        started = start + timedelta(milliseconds=index * 7)
        rows.append(
            {
                "request_id": uuid.uuid4(),
                "started_at": started,
                "client_request_id": None,
                "endpoint": "chat",
                "key_id": f"key{index % 1000:04d}",
                "team_id": 1 + index % 50,
                "user_id": 1 + index % 200,
                "end_user": f"eu{index % 5000}",
                "model": ("m-small", "m-large", "m-embed")[index % 3],
                "deployment": "d1",
                "upstream_model": "m",
                "prompt_tokens": 100 + index % 900,
                "cached_prompt_tokens": 0,
                "completion_tokens": 50 + index % 400,
                "reasoning_tokens": 0,
                "usage_source": "backend",
                "cost_nanousd": 1000 + index % 100000,
                "price_id": 1,
                "status_code": 200,
                "error_type": None,
                "finish_reason": "stop",
                "streamed": index % 2 == 0,
                "client_disconnected": False,
                "first_token_ms": 12.5,
                "duration_ms": 240.0,
                "tags": ["prod"] if index % 4 == 0 else None,
                "first_token_at": started,
                "ended_at": started,
                "queue_ms": None,
            }
        )
    return rows


def bench_inserts(engine: sa.Engine, total: int, batch: int) -> dict[str, float]:
    rows = make_rows(total, datetime.now(UTC).replace(minute=0, second=0, microsecond=0))
    batch_times = []
    started = time.perf_counter()
    for offset in range(0, total, batch):
        begin = time.perf_counter()
        insert_rows(engine, rows[offset : offset + batch])
        batch_times.append(time.perf_counter() - begin)
    elapsed = time.perf_counter() - started
    replay_started = time.perf_counter()
    insert_rows(engine, rows[:batch])  # a replayed batch: all conflicts
    return {
        "rows": total,
        "batch": batch,
        "rows_per_second": total / elapsed,
        "batch_p50_ms": statistics.median(batch_times) * 1000,
        "batch_max_ms": max(batch_times) * 1000,
        "replayed_batch_ms": (time.perf_counter() - replay_started) * 1000,
    }


FILL = """
INSERT INTO usage (request_id, started_at, endpoint, key_id, team_id, user_id, end_user, model, deployment,
                   prompt_tokens, completion_tokens, cost_nanousd, status_code, streamed, duration_ms, usage_source)
SELECT gen_random_uuid(), :start + (n * :step) * interval '1 millisecond', 'chat', 'key' || (n % 1000),
       1 + n % 50, 1 + n % 200, 'eu' || (n % 5000), (ARRAY['m-small','m-large','m-embed'])[1 + n % 3], 'd1',
       100 + n % 900, 50 + n % 400, 1000 + n % 100000, 200, n % 2 = 0, 240.0, 'backend'
FROM generate_series(CAST(:first AS BIGINT), CAST(:last AS BIGINT)) AS n
"""

ROLLUP = """
INSERT INTO usage_rollups (granularity, bucket_start, team_id, user_id, key_id, model, requests, errors,
                           prompt_tokens, cached_prompt_tokens, completion_tokens, reasoning_tokens, cost_nanousd)
SELECT CAST(:granularity AS VARCHAR), date_trunc(CAST(:granularity AS TEXT), started_at), team_id,
       coalesce(user_id, 0), coalesce(key_id, ''), model,
       count(*), 0, sum(prompt_tokens), 0, sum(completion_tokens), 0, sum(cost_nanousd)
FROM usage GROUP BY 1, 2, 3, 4, 5, 6
"""


def fill_ledger(engine: sa.Engine, total: int, start: datetime, days: int) -> float:
    step = days * 86_400_000 / total
    started = time.perf_counter()
    with engine.begin() as connection:
        for month in range(days // 28 + 2):
            ensure_month_partition(connection, start + timedelta(days=31 * month))
    chunk = 1_000_000
    for first in range(0, total, chunk):
        with engine.begin() as connection:
            connection.execute(
                sa.text(FILL), {"start": start, "step": step, "first": first, "last": min(first + chunk, total) - 1}
            )
    with engine.begin() as connection:
        for granularity in ("hour", "day"):
            connection.execute(sa.text(ROLLUP), {"granularity": granularity})
        connection.execute(sa.text("ANALYZE"))
    return time.perf_counter() - started


def time_report(engine: sa.Engine, **kwargs: Any) -> float:
    timings = []
    for _ in range(5):
        started = time.perf_counter()
        usage_report(engine, **kwargs)
        timings.append(time.perf_counter() - started)
    return statistics.median(timings) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--insert-rows", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--ledger-rows", type=int, default=10_000_000)
    args = parser.parse_args()

    name = f"gw_bench_ledger_{secrets.token_hex(4)}"
    with psycopg.connect(ADMIN_URL, autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{name}"')
    engine = create_engine(ADMIN_URL.rsplit("/", 1)[0] + f"/{name}")
    try:
        migrate.upgrade(engine)
        inserts = bench_inserts(engine, args.insert_rows, args.batch)
        print(
            f"writer inserts: {inserts['rows_per_second']:,.0f} rows/s ({inserts['rows']:,} rows, batches of "
            f"{inserts['batch']}: p50 {inserts['batch_p50_ms']:.1f} ms, max {inserts['batch_max_ms']:.1f} ms; "
            f"a fully replayed batch {inserts['replayed_batch_ms']:.1f} ms)"
        )
        with engine.begin() as connection:
            connection.execute(sa.text("TRUNCATE usage, usage_rollups, usage_tag_rollups"))
        start = datetime(2026, 8, 1, tzinfo=UTC)
        filled = fill_ledger(engine, args.ledger_rows, start, days=90)
        print(f"ledger filled: {args.ledger_rows:,} rows over 90 days in {filled:.0f} s")
        month = {"start": datetime(2026, 9, 1, tzinfo=UTC), "end": datetime(2026, 10, 1, tzinfo=UTC)}
        for group_by in ("model", "user", "key", "day"):
            print(
                f"report, one team, one month, by {group_by:5}: "
                f"{time_report(engine, group_by=group_by, team_id=7, **month):7.1f} ms"
            )
        print(f"report, all teams, one month, by team : {time_report(engine, group_by='team', **month):7.1f} ms")
        print(
            f"report, one team, one month, by end-user (raw rows): "
            f"{time_report(engine, group_by='end-user', team_id=7, **month):7.1f} ms"
        )
    finally:
        engine.dispose()
        with psycopg.connect(ADMIN_URL, autocommit=True) as connection:
            connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


if __name__ == "__main__":
    main()
