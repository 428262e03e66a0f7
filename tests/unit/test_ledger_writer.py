"""The ledger writer's insert: idempotent, and rollups equal a GROUP BY over exactly the rows inserted.

Runs against real SQLite and PostgreSQL databases created here; migrations, partition upkeep and the reports are
checked on both too.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.db import migrate
from gateway.db.partitions import drop_partitions_before, ensure_partitions, existing_partitions, month_start
from gateway.db.schema import metadata, usage, usage_rollups, usage_tag_rollups
from gateway.metering.reports import forget_end_user, usage_report
from gateway.metering.writer import insert_rows
from tests.harness import Database, create_database

BASE = datetime(2026, 11, 20, tzinfo=UTC)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Database]:
    db = create_database(request.param, Path(tmp_path_factory.mktemp("ledger")))
    yield db
    db.drop()


def clear(engine: sa.Engine) -> None:
    with engine.begin() as connection:
        for table in (usage, usage_rollups, usage_tag_rollups):
            connection.execute(table.delete())


rows_strategy = st.lists(
    st.fixed_dictionaries(
        {
            "minutes": st.integers(0, 3 * 24 * 60),
            "team_id": st.integers(1, 3),
            "user_id": st.one_of(st.none(), st.integers(1, 3)),
            "key": st.sampled_from(["k1", "k2", "k3"]),
            "model": st.sampled_from(["m-a", "m-b"]),
            "tags": st.one_of(st.none(), st.lists(st.sampled_from(["research", "prod", "cc-42"]), unique=True)),
            "status": st.sampled_from([200, 200, 200, 499, 502]),
            "prompt": st.integers(0, 5000),
            "completion": st.integers(0, 5000),
            "cost": st.integers(0, 10**9),
            "end_user": st.one_of(st.none(), st.sampled_from(["u1", "u2"])),
        }
    ),
    min_size=1,
    max_size=60,
)


def ledger_row(spec: dict[str, Any]) -> dict[str, Any]:
    started = BASE + timedelta(minutes=spec["minutes"])
    return {
        "request_id": uuid.uuid4(),
        "started_at": started,
        "client_request_id": None,
        "endpoint": "chat",
        "key_id": spec["key"],
        "team_id": spec["team_id"],
        "user_id": spec["user_id"],
        "end_user": spec["end_user"],
        "model": spec["model"],
        "deployment": "d",
        "upstream_model": spec["model"],
        "prompt_tokens": spec["prompt"],
        "cached_prompt_tokens": spec["prompt"] // 3,
        "completion_tokens": spec["completion"],
        "reasoning_tokens": 0,
        "usage_source": "backend",
        "cost_nanousd": spec["cost"],
        "price_id": None,
        "status_code": spec["status"],
        "error_type": None,
        "finish_reason": "stop",
        "streamed": False,
        "client_disconnected": False,
        "first_token_ms": 1.0,
        "duration_ms": 2.0,
        "tags": spec["tags"],
        "first_token_at": started,
        "ended_at": started,
        "queue_ms": None,
    }


def expected_rollups(rows: list[dict[str, Any]], granularity: str) -> dict[tuple[Any, ...], tuple[int, ...]]:
    totals: dict[tuple[Any, ...], list[int]] = defaultdict(lambda: [0] * 5)
    for row in rows:
        bucket = row["started_at"].replace(minute=0, second=0, microsecond=0)
        if granularity == "day":
            bucket = bucket.replace(hour=0)
        key = (bucket, row["team_id"], row["user_id"] or 0, row["key_id"], row["model"])
        for index, value in enumerate(
            (1, int(row["status_code"] >= 400), row["prompt_tokens"], row["completion_tokens"], row["cost_nanousd"])
        ):
            totals[key][index] += value
    return {key: tuple(value) for key, value in totals.items()}


def actual_rollups(engine: sa.Engine, granularity: str) -> dict[tuple[Any, ...], tuple[int, ...]]:
    table = usage_rollups
    query = sa.select(
        table.c.bucket_start,
        table.c.team_id,
        table.c.user_id,
        table.c.key_id,
        table.c.model,
        table.c.requests,
        table.c.errors,
        table.c.prompt_tokens,
        table.c.completion_tokens,
        table.c.cost_nanousd,
    ).where(table.c.granularity == granularity)
    with engine.connect() as connection:
        result = {}
        for row in connection.execute(query):
            bucket = row[0] if row[0].tzinfo else row[0].replace(tzinfo=UTC)
            result[(bucket, *row[1:5])] = tuple(row[5:])
    return result


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(specs=rows_strategy, replay=st.integers(0, 10))
def test_rollups_equal_a_group_by_even_with_replays(
    database: Database, specs: list[dict[str, Any]], replay: int
) -> None:
    clear(database.engine)
    rows = [ledger_row(spec) for spec in specs]
    half = len(rows) // 2
    assert insert_rows(database.engine, rows[:half]) == half
    # A replayed batch (a writer retrying after a crash) overlaps what is already in: nothing counts twice.
    assert insert_rows(database.engine, rows[: half + replay][::-1]) == min(replay, len(rows) - half)
    insert_rows(database.engine, rows)
    for granularity in ("hour", "day"):
        assert actual_rollups(database.engine, granularity) == expected_rollups(rows, granularity)
    with database.engine.connect() as connection:
        assert connection.execute(sa.select(sa.func.count()).select_from(usage)).scalar() == len(rows)
        tag_total = connection.execute(
            sa.select(sa.func.sum(usage_tag_rollups.c.requests)).where(usage_tag_rollups.c.granularity == "day")
        ).scalar()
    assert (tag_total or 0) == sum(len(row["tags"] or ()) for row in rows)


def test_reports_match_the_raw_rows(database: Database) -> None:
    clear(database.engine)
    rows = [
        ledger_row(
            {
                "minutes": minute * 37,
                "team_id": 1 + minute % 2,
                "user_id": minute % 3 or None,
                "key": f"k{minute % 4}",
                "model": "m-a" if minute % 3 else "m-b",
                "tags": ["prod"] if minute % 5 == 0 else None,
                "status": 200,
                "prompt": minute,
                "completion": 2 * minute,
                "cost": 1000 * minute,
                "end_user": f"u{minute % 2}",
            }
        )
        for minute in range(200)
    ]
    insert_rows(database.engine, rows)
    start, end = BASE, BASE + timedelta(days=6)
    by_model = usage_report(database.engine, start=start, end=end, group_by="model", team_id=1)
    expected: dict[str, int] = defaultdict(int)
    for row in rows:
        if row["team_id"] == 1:
            expected[row["model"]] += row["cost_nanousd"]
    assert {line["group"]: line["cost_nanousd"] for line in by_model} == expected
    # Hourly precision: a range that starts mid-day uses the hourly rollups.
    partial = usage_report(database.engine, start=BASE + timedelta(hours=5), end=end, group_by="model")
    late = [row for row in rows if row["started_at"] >= BASE + timedelta(hours=5)]
    assert sum(line["requests"] for line in partial) == len(late)
    by_end_user = usage_report(database.engine, start=start, end=end, group_by="end-user")
    assert sum(line["requests"] for line in by_end_user) == len(rows)
    by_tag = usage_report(database.engine, start=start, end=end, group_by="tag")
    assert by_tag == [] or by_tag[0]["group"] == "prod"
    assert by_tag[0]["requests"] == sum(1 for row in rows if row["tags"])

    deleted = forget_end_user(database.engine, "u1")
    assert deleted == 100
    after = usage_report(database.engine, start=start, end=end, group_by="model")
    assert sum(line["requests"] for line in after) == len(rows)  # the rollups keep the totals


def test_migrations_round_trip_and_match_the_models(database: Database) -> None:
    migrate.downgrade(database.engine, "base")
    with database.engine.connect() as connection:
        assert sa.inspect(connection).get_table_names() == ["alembic_version"]
    migrate.upgrade(database.engine)
    with database.engine.connect() as connection:
        context = MigrationContext.configure(
            connection,
            opts={
                "include_name": lambda name, kind, _: (
                    not (kind == "table" and name and (name.startswith("usage_y") or name == "usage_default"))
                ),
                "compare_type": True,
            },
        )
        assert compare_metadata(context, metadata) == []


def test_partitions_are_kept_ahead_and_retention_drops_old_months(database: Database) -> None:
    if database.engine.dialect.name != "postgresql":
        pytest.skip("partitions are a PostgreSQL feature; SQLite keeps one table")
    clear(database.engine)
    old = ledger_row(
        {
            "minutes": 0,
            "team_id": 1,
            "user_id": None,
            "key": "k",
            "model": "m",
            "tags": None,
            "status": 200,
            "prompt": 1,
            "completion": 1,
            "cost": 5,
            "end_user": None,
        }
    )
    old["started_at"] = datetime(2025, 1, 15, tzinfo=UTC)
    insert_rows(database.engine, [old])
    with database.engine.begin() as connection:
        created = ensure_partitions(connection, now=datetime(2025, 1, 20, tzinfo=UTC))
        assert "usage_y2025m01" in created
        assert connection.execute(sa.text("SELECT count(*) FROM usage_default")).scalar() == 0
        assert connection.execute(sa.text("SELECT count(*) FROM usage_y2025m01")).scalar() == 1
        dropped = drop_partitions_before(connection, month_start(2025, 3))
        assert "usage_y2025m01" in dropped and "usage_y2025m01" not in existing_partitions(connection)
    report = usage_report(
        database.engine, start=datetime(2025, 1, 1, tzinfo=UTC), end=datetime(2025, 2, 1, tzinfo=UTC), group_by="model"
    )
    assert report[0]["cost_nanousd"] == 5  # raw rows gone, rollups stay
