"""Usage reports: totals over a date range, grouped by any of team, user, key, model, tag, end user, day, hour.

Where the numbers come from: the rollup tables that the ledger writer keeps current (`usage_rollups` for team /
user / key / model, `usage_tag_rollups` for tags), hourly and daily, so a month's report is a small query whatever
the size of the ledger. Only grouping by the request's end user (`user` field of the request) reads the raw ledger,
since rollups do not keep that dimension. Rollups resolve to the hour (to the day when the range is whole days), so
the range is widened to whole buckets; the response says which resolution was used.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import sqlalchemy as sa

from gateway.auth import keys as key_format
from gateway.db.engine import as_utc
from gateway.db.schema import ROLLUP_SUMS, teams, usage, usage_rollups, usage_tag_rollups, users
from gateway.errors import InvalidRequest
from gateway.metering.cost import nano_to_usd

DIMENSIONS = ("team", "user", "key", "model", "tag", "end_user", "day", "hour")
TIME_DIMENSIONS = ("day", "hour")
METRICS = (*ROLLUP_SUMS, "total_tokens", "cost_usd")
_HOUR, _DAY = timedelta(hours=1), timedelta(days=1)


@dataclass(frozen=True, slots=True)
class UsageQuery:
    start: datetime  # inclusive, UTC
    end: datetime  # exclusive, UTC
    group_by: tuple[str, ...] = ()
    team_id: int | None = None
    user_id: int | None = None
    key_id: str | None = None
    model: str | None = None
    limit: int | None = None  # the top N groups by cost (rankings, e.g. top consumers)

    def __post_init__(self) -> None:
        unknown = [name for name in self.group_by if name not in DIMENSIONS]
        if unknown:
            raise InvalidRequest(
                f"cannot group by {', '.join(unknown)}; choose from {', '.join(DIMENSIONS)}", param="group_by"
            )
        if self.end <= self.start:
            raise InvalidRequest("the range is empty: 'to' must be after 'from'", param="to")
        if "end_user" in self.group_by and "tag" in self.group_by:
            raise InvalidRequest("end_user and tag cannot be combined", param="group_by")
        if "tag" in self.group_by and ({"user", "key"} & set(self.group_by) or self.user_id or self.key_id):
            raise InvalidRequest("tag reports group by team, model and time only", param="group_by")

    @property
    def resolution(self) -> str:
        """Hourly rollups unless the range is whole days and no hourly grouping is asked for."""
        if "end_user" in self.group_by:
            return "exact"
        whole_days = _floor(self.start, _DAY) == self.start and _floor(self.end, _DAY) == self.end
        return "day" if whole_days and "hour" not in self.group_by else "hour"


def _floor(moment: datetime, step: timedelta) -> datetime:
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    return epoch + ((moment - epoch) // step) * step


def _ceil(moment: datetime, step: timedelta) -> datetime:
    floored = _floor(moment, step)
    return floored if floored == moment else floored + step


def run_query(connection: sa.Connection, query: UsageQuery) -> dict[str, Any]:
    if query.resolution == "exact":
        groups = _raw(connection, query)
        start, end = query.start, query.end
    else:
        step = _DAY if query.resolution == "day" else _HOUR
        start, end = _floor(query.start, step), _ceil(query.end, step)
        groups = _rollups(connection, query, query.resolution, start, end)
    rows = _label(connection, query, _fold(query, groups))
    return {"from": start, "to": end, "resolution": query.resolution, "group_by": list(query.group_by), "rows": rows}


def _dimension_columns(table: sa.Table, group_by: tuple[str, ...]) -> list[tuple[str, Any]]:
    mapping = {
        "team": "team_id",
        "user": "user_id",
        "key": "key_id",
        "model": "model",
        "tag": "tag",
        "end_user": "end_user",
    }
    return [(name, table.c[mapping[name]]) for name in group_by if name not in TIME_DIMENSIONS]


def _sums(table: sa.Table) -> list[Any]:
    return [sa.func.coalesce(sa.func.sum(table.c[name]), 0).label(name) for name in ROLLUP_SUMS]


def _rollups(
    connection: sa.Connection, query: UsageQuery, granularity: str, start: datetime, end: datetime
) -> list[dict[str, Any]]:
    table = usage_tag_rollups if "tag" in query.group_by else usage_rollups
    dims = _dimension_columns(table, query.group_by)
    keys = [column.label(name) for name, column in dims]
    if any(name in query.group_by for name in TIME_DIMENSIONS):
        keys.append(table.c.bucket_start.label("bucket"))
    statement = sa.select(*keys, *_sums(table)).where(
        table.c.granularity == granularity, table.c.bucket_start >= start, table.c.bucket_start < end
    )
    if query.team_id is not None:
        statement = statement.where(table.c.team_id == query.team_id)
    if query.model:
        statement = statement.where(table.c.model == query.model)
    if query.user_id is not None:
        statement = statement.where(usage_rollups.c.user_id == query.user_id)
    if query.key_id is not None:
        statement = statement.where(usage_rollups.c.key_id == query.key_id)
    if keys:
        statement = statement.group_by(*[key.element for key in keys])
    return [dict(row) for row in connection.execute(statement).mappings()]


def _hour_of(connection: sa.Connection, column: Any) -> Any:
    if connection.dialect.name == "postgresql":
        # Constants inline (not bound): PostgreSQL must see the same expression in SELECT and GROUP BY.
        return sa.func.date_trunc(sa.literal_column("'hour'"), sa.func.timezone(sa.literal_column("'UTC'"), column))
    return sa.func.strftime(sa.literal_column("'%Y-%m-%d %H:00:00'"), column)


def _raw(connection: sa.Connection, query: UsageQuery) -> list[dict[str, Any]]:
    dims = _dimension_columns(usage, query.group_by)
    keys = [column.label(name) for name, column in dims]
    if any(name in query.group_by for name in TIME_DIMENSIONS):
        keys.append(_hour_of(connection, usage.c.started_at).label("bucket"))
    sums = [
        sa.func.count().label("requests"),
        sa.func.coalesce(sa.func.sum(sa.case((usage.c.status_code >= 400, 1), else_=0)), 0).label("errors"),
        *[sa.func.coalesce(sa.func.sum(usage.c[name]), 0).label(name) for name in ROLLUP_SUMS[2:]],
    ]
    statement = sa.select(*keys, *sums).where(usage.c.started_at >= query.start, usage.c.started_at < query.end)
    for column, value in (
        ("team_id", query.team_id),
        ("user_id", query.user_id),
        ("key_id", query.key_id),
        ("model", query.model),
    ):
        if value is not None and value != "":
            statement = statement.where(usage.c[column] == value)
    if keys:
        statement = statement.group_by(*[key.element for key in keys])
    return [dict(row) for row in connection.execute(statement).mappings()]


def _bucket(value: Any) -> datetime:
    if isinstance(value, str):  # SQLite's strftime
        value = datetime.fromisoformat(value)
    moment = as_utc(value)
    assert moment is not None
    return moment


def _fold(query: UsageQuery, groups: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Hourly buckets become the day or hour asked for; missing dimensions (0 / '') become None."""
    folded: dict[tuple[Any, ...], dict[str, Any]] = {}
    for group in groups:
        key_values: dict[str, Any] = {}
        for name in query.group_by:
            if name in TIME_DIMENSIONS:
                bucket = _bucket(group["bucket"])
                key_values[name] = bucket.date().isoformat() if name == "day" else bucket.strftime("%Y-%m-%dT%H:00:00Z")
            else:
                value = group[name]
                key_values[name] = None if value in (0, "", None) else value
        identity = tuple(key_values.values())
        entry = folded.setdefault(identity, {**key_values, **{name: 0 for name in ROLLUP_SUMS}})
        for name in ROLLUP_SUMS:
            entry[name] += int(group[name] or 0)
    rows = list(folded.values())
    for row in rows:
        row["total_tokens"] = row["prompt_tokens"] + row["completion_tokens"]
        row["cost_usd"] = str(nano_to_usd(row["cost_nanousd"]).normalize() if row["cost_nanousd"] else Decimal(0))
    time_dims = [name for name in query.group_by if name in TIME_DIMENSIONS]
    rows.sort(key=lambda row: (*(row[name] for name in time_dims), -row["cost_nanousd"], -row["requests"]))
    if query.limit is not None:
        rows = rows[: query.limit]
    return rows


def _label(connection: sa.Connection, query: UsageQuery, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Ids become names: team and user names, key display prefixes."""
    if "team" in query.group_by:
        names = dict(connection.execute(sa.select(teams.c.id, teams.c.name)).all())
        for row in rows:
            row["team"] = names.get(row["team"], row["team"]) if row["team"] is not None else None
    if "user" in query.group_by:
        names = dict(connection.execute(sa.select(users.c.id, users.c.name)).all())
        for row in rows:
            row["user"] = names.get(row["user"], row["user"]) if row["user"] is not None else None
    if "key" in query.group_by:
        for row in rows:
            row["key"] = key_format.display_prefix(row["key"]) if row["key"] is not None else None
    return rows


def to_csv(report: dict[str, Any]) -> str:
    columns = [*report["group_by"], *METRICS]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for row in report["rows"]:
        writer.writerow(["" if row.get(column) is None else row[column] for column in columns])
    return buffer.getvalue()


def parse_moment(text: str | None, *, default: datetime, param: str) -> datetime:
    """ISO dates or datetimes; naive means UTC. A date alone is its midnight."""
    if not text:
        return default
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise InvalidRequest(f"cannot read {param}={text!r}: use an ISO date or datetime", param=param) from None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
