"""Monthly partitions of the usage ledger on PostgreSQL (SQLite keeps one table).

The ledger is `PARTITION BY RANGE (started_at)` with one partition per UTC month, plus a default partition that
catches anything outside them. Partitions are created ahead of time (this month and the next two) by start-up
and by `gateway db maintain`; rows that landed in the default partition are moved into a month's partition when
it is created. Retention drops whole months of raw rows; the rollups stay.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime

import sqlalchemy as sa

_NAME = re.compile(r"^usage_y(\d{4})m(\d{2})$")


def month_start(year: int, month: int) -> datetime:
    return datetime(year, month, 1, tzinfo=UTC)


def next_month(moment: datetime) -> datetime:
    return month_start(moment.year + (moment.month == 12), moment.month % 12 + 1)


def partition_name(moment: datetime) -> str:
    return f"usage_y{moment.year:04d}m{moment.month:02d}"


def is_partitioned(connection: sa.Connection) -> bool:
    if connection.dialect.name != "postgresql":
        return False
    query = sa.text(
        "SELECT count(*) FROM pg_partitioned_table p JOIN pg_class c ON c.oid = p.partrelid WHERE c.relname = 'usage'"
    )
    return bool(connection.execute(query).scalar())


def existing_partitions(connection: sa.Connection) -> list[str]:
    query = sa.text(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
        "JOIN pg_class p ON p.oid = i.inhparent WHERE p.relname = 'usage' ORDER BY c.relname"
    )
    return [row[0] for row in connection.execute(query)]


def ensure_month_partition(connection: sa.Connection, moment: datetime) -> bool:
    """Create the partition of `moment`'s month if missing, moving its rows out of the default partition."""
    name = partition_name(moment)
    if name in existing_partitions(connection):
        return False
    start = month_start(moment.year, moment.month)
    end = next_month(start)
    bounds = {"start": start, "end": end}
    connection.execute(sa.text(f'CREATE TABLE "{name}" (LIKE usage INCLUDING DEFAULTS)'))
    connection.execute(
        sa.text(f'INSERT INTO "{name}" SELECT * FROM usage_default WHERE started_at >= :start AND started_at < :end'),
        bounds,
    )
    connection.execute(sa.text("DELETE FROM usage_default WHERE started_at >= :start AND started_at < :end"), bounds)
    connection.execute(
        sa.text(
            f"ALTER TABLE usage ATTACH PARTITION \"{name}\" FOR VALUES FROM ('{start.isoformat()}') "
            f"TO ('{end.isoformat()}')"
        )
    )
    return True


def ensure_partitions(connection: sa.Connection, *, now: datetime | None = None, months_ahead: int = 2) -> list[str]:
    """This month's partition and the next `months_ahead`; returns the names created."""
    if not is_partitioned(connection):
        return []
    moment = month_start((now or datetime.now(UTC)).year, (now or datetime.now(UTC)).month)
    created = []
    for _ in range(months_ahead + 1):
        if ensure_month_partition(connection, moment):
            created.append(partition_name(moment))
        moment = next_month(moment)
    return created


def drop_partitions_before(connection: sa.Connection, cutoff: datetime) -> list[str]:
    """Retention: drop every month partition that ends on or before `cutoff`. Rollups are not touched."""
    dropped = []
    for name in existing_partitions(connection):
        match = _NAME.match(name)
        if match and next_month(month_start(int(match.group(1)), int(match.group(2)))) <= cutoff:
            connection.execute(sa.text(f'DROP TABLE "{name}"'))
            dropped.append(name)
    return dropped
