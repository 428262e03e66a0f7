"""Usage reports: tokens and cost over a date range, grouped by user, end user, key, tag, model, team or day.

Grouped reports read the hourly/daily rollups (a month for a team is a few hundred rollup rows, however large the
ledger); only `end-user` reads raw ledger rows (end users are too many to roll up), through the
(team_id, started_at) index. Ranges are [start, end) in UTC; whole days use the daily rollups, anything else the
hourly ones, so a report is exact to the hour.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa

from gateway.auth.keys import display_prefix
from gateway.db.schema import ROLLUP_SUMS, teams, usage, usage_rollups, usage_tag_rollups, users
from gateway.metering.cost import nano_to_usd

GROUPS = ("team", "user", "end-user", "key", "tag", "model", "day", "hour")


class ReportError(Exception):
    """The report cannot be made as asked; the message says why."""


def _granularity(start: datetime, end: datetime, group_by: str) -> str:
    if group_by == "hour":
        return "hour"
    whole_days = all(
        moment.hour == moment.minute == moment.second == moment.microsecond == 0 for moment in (start, end)
    )
    return "day" if whole_days else "hour"


def _check_range(start: datetime, end: datetime) -> None:
    if start.tzinfo is None or end.tzinfo is None:
        raise ReportError("report ranges must be timezone-aware (UTC)")
    if end <= start:
        raise ReportError("the end of the range must be after its start")
    if start.minute or start.second or start.microsecond or end.minute or end.second or end.microsecond:
        raise ReportError("report ranges start and end on a whole hour")


def usage_report(
    engine: sa.Engine, *, start: datetime, end: datetime, group_by: str, team_id: int | None = None
) -> list[dict[str, Any]]:
    if group_by not in GROUPS:
        raise ReportError(f"cannot group by {group_by!r}; one of {', '.join(GROUPS)}")
    _check_range(start, end)
    if group_by == "end-user":
        return _end_user_report(engine, start, end, team_id)
    table = usage_tag_rollups if group_by == "tag" else usage_rollups
    granularity = _granularity(start, end, group_by)
    column = _group_column(table, group_by)
    query = (
        sa.select(column.label("group"), *(sa.func.sum(table.c[name]).label(name) for name in ROLLUP_SUMS))
        .where(table.c.granularity == granularity, table.c.bucket_start >= start, table.c.bucket_start < end)
        .group_by(column)
        .order_by(column)
    )
    if team_id is not None:
        query = query.where(table.c.team_id == team_id)
    with engine.connect() as connection:
        rows = [dict(row) for row in connection.execute(query).mappings()]
        names = _names(connection, group_by)
    if group_by == "key":
        names = {row["group"]: key_label(row["group"]) for row in rows}
    return [_finish(row, names) for row in rows]


def _group_column(table: sa.Table, group_by: str) -> sa.ColumnElement[Any]:
    if group_by in ("day", "hour"):
        return table.c.bucket_start
    column_name = {"team": "team_id", "user": "user_id", "key": "key_id", "tag": "tag", "model": "model"}[group_by]
    return table.c[column_name]


def _names(connection: sa.Connection, group_by: str) -> dict[Any, str]:
    if group_by == "team":
        return dict(connection.execute(sa.select(teams.c.id, teams.c.name)).all())
    if group_by == "user":
        return dict(connection.execute(sa.select(users.c.id, users.c.name)).all())
    return {}


def _finish(row: dict[str, Any], names: dict[Any, str]) -> dict[str, Any]:
    group = row["group"]
    if isinstance(group, datetime):
        group = (group if group.tzinfo else group.replace(tzinfo=UTC)).isoformat()
    elif names:
        group = names.get(group, "(none)" if group in (0, None) else str(group))
    elif group is None:
        group = "(none)"
    result = {"group": group, **{name: int(row[name] or 0) for name in ROLLUP_SUMS}}
    result["cost_usd"] = str(nano_to_usd(result["cost_nanousd"]))
    return result


def _end_user_report(engine: sa.Engine, start: datetime, end: datetime, team_id: int | None) -> list[dict[str, Any]]:
    errors = sa.func.sum(sa.case((usage.c.status_code >= 400, 1), else_=0))
    query = (
        sa.select(
            usage.c.end_user.label("group"),
            sa.func.count().label("requests"),
            errors.label("errors"),
            *(sa.func.sum(usage.c[name]).label(name) for name in ROLLUP_SUMS[2:]),
        )
        .where(usage.c.started_at >= start, usage.c.started_at < end)
        .group_by(usage.c.end_user)
        .order_by(usage.c.end_user)
    )
    if team_id is not None:
        query = query.where(usage.c.team_id == team_id)
    with engine.connect() as connection:
        return [_finish(dict(row), {}) for row in connection.execute(query).mappings()]


def key_label(key_id: str) -> str:
    return display_prefix(key_id) if key_id else "(none)"


def parse_day_or_time(text: str) -> datetime:
    """`2026-11-01` or an ISO time; naive values are UTC."""
    moment = datetime.fromisoformat(text)
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def default_range(now: datetime | None = None) -> tuple[datetime, datetime]:
    """This calendar month so far, through the end of today."""
    now = now or datetime.now(UTC)
    start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    return start, now.replace(hour=0, minute=0, second=0, microsecond=0) + timedelta(days=1)


def forget_end_user(engine: sa.Engine, end_user: str, *, team_id: int | None = None) -> int:
    """Delete one end user's raw ledger rows (a data-subject request); the rollups, which hold no end-user data,
    keep the totals. Returns the number of rows deleted."""
    statement = usage.delete().where(usage.c.end_user == end_user)
    if team_id is not None:
        statement = statement.where(usage.c.team_id == team_id)
    with engine.begin() as connection:
        return int(connection.execute(statement).rowcount)
