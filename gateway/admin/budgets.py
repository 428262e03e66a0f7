"""Budget use: for each scope with a daily or monthly budget (team, its keys, their users), what has been used in
the current UTC day and month against the effective limit (config default, overridden from SQL).

Read from the daily rollups, so it trails the limiter's own counters by at most a ledger flush. It is what the
dashboard draws as bars and what the budget alerts compare with their thresholds; the limiter, not this, is what
refuses requests.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa

from gateway.auth import keys as key_format
from gateway.db.schema import api_keys, teams, usage_rollups, users
from gateway.limits.checks import Periods
from gateway.limits.policy import Override, OverrideKey, ScopeLimits, merge
from gateway.settings import Limits, LimitValues

# (metric, period kind, ScopeLimits attribute, counts cost rather than tokens)
_BUDGETS = (
    ("daily_tokens", "day", "daily_tokens", False),
    ("monthly_tokens", "month", "monthly_tokens", False),
    ("daily_cost", "day", "daily_cost_nanousd", True),
    ("monthly_cost", "month", "monthly_cost_nanousd", True),
)


@dataclass(frozen=True, slots=True)
class BudgetUse:
    scope: str  # team, user, key
    scope_id: str
    subject: str  # a team or user name, a key prefix
    team_id: int | None  # None for users (their budget spans teams)
    metric: str  # daily_tokens, monthly_tokens, daily_cost, monthly_cost
    period: str  # d<days since epoch> or m<yyyymm>, as the limiter names them
    used: int  # tokens, or nano-USD
    limit: int
    hard: bool

    @property
    def percent(self) -> float:
        return 100.0 * self.used / self.limit if self.limit else 100.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "scope": self.scope,
            "subject": self.subject,
            "metric": self.metric,
            "period": self.period,
            "used": self.used,
            "limit": self.limit,
            "percent": round(self.percent, 2),
            "mode": "hard" if self.hard else "soft",
            "unit": "nanousd" if self.metric.endswith("cost") else "tokens",
        }


def _used(connection: sa.Connection, column: str, periods: Periods, team_id: int | None) -> dict[Any, dict[str, int]]:
    """Tokens and cost of today and of this month per team, key or user, from the daily rollups."""
    day_start = datetime.fromtimestamp(periods.day_start / 1000, UTC)
    month_start = datetime.fromtimestamp(periods.month_start / 1000, UTC)
    table = usage_rollups
    tokens = table.c.prompt_tokens + table.c.completion_tokens
    today = table.c.bucket_start >= day_start
    statement = (
        sa.select(
            table.c[column].label("id"),
            sa.func.sum(sa.case((today, tokens), else_=0)).label("day_tokens"),
            sa.func.sum(sa.case((today, table.c.cost_nanousd), else_=0)).label("day_cost"),
            sa.func.sum(tokens).label("month_tokens"),
            sa.func.sum(table.c.cost_nanousd).label("month_cost"),
        )
        .where(table.c.granularity == "day", table.c.bucket_start >= month_start)
        .group_by(table.c[column])
    )
    if team_id is not None and column != "user_id":
        statement = statement.where(table.c.team_id == team_id)
    return {
        row.id: {
            "daily_tokens": int(row.day_tokens or 0),
            "daily_cost": int(row.day_cost or 0),
            "monthly_tokens": int(row.month_tokens or 0),
            "monthly_cost": int(row.month_cost or 0),
        }
        for row in connection.execute(statement)
    }


def _uses(
    limits: ScopeLimits | None, scope: str, scope_id: str, team_id: int | None, used: dict[str, int], periods: Periods
) -> list[BudgetUse]:
    if limits is None or not limits.has_budgets:
        return []
    found = []
    for metric, kind, attribute, _cost in _BUDGETS:
        limit = getattr(limits, attribute)
        if limit is None:
            continue
        found.append(
            BudgetUse(
                scope=scope,
                scope_id=scope_id,
                subject=limits.subject,
                team_id=team_id,
                metric=metric,
                period=periods.day_id if kind == "day" else periods.month_id,
                used=used.get(metric, 0),
                limit=limit,
                hard=limits.hard_budgets,
            )
        )
    return found


def _merge(default: LimitValues | None, override: Override | None, scope: str, subject: str) -> ScopeLimits | None:
    return merge(default, override, scope=scope, subject=subject, label="", slot="")


def budget_uses(
    connection: sa.Connection,
    limits: Limits,
    overrides: Mapping[OverrideKey, Override],
    *,
    team_id: int | None = None,
    now: float | None = None,
) -> list[BudgetUse]:
    """Every budget in force for the teams (one team, or all enabled teams), their active keys and their users."""
    periods = Periods.at(int((now if now is not None else time.time()) * 1000))
    team_query = sa.select(teams.c.id, teams.c.name).where(teams.c.disabled.is_(sa.false()))
    key_query = (
        sa.select(api_keys.c.id, api_keys.c.team_id, api_keys.c.user_id)
        .join(teams, teams.c.id == api_keys.c.team_id)
        .where(api_keys.c.revoked_at.is_(None), teams.c.disabled.is_(sa.false()))
    )
    if team_id is not None:
        team_query = team_query.where(teams.c.id == team_id)
        key_query = key_query.where(api_keys.c.team_id == team_id)
    team_rows = connection.execute(team_query).all()
    key_rows = connection.execute(key_query).all()
    user_ids = {row.user_id for row in key_rows if row.user_id is not None}
    user_names = dict(connection.execute(sa.select(users.c.id, users.c.name).where(users.c.id.in_(user_ids))).all())
    found: list[BudgetUse] = []

    if limits.team is not None or any(key[0] == "team" for key in overrides):
        used = _used(connection, "team_id", periods, team_id)
        for row in team_rows:
            scope_limits = _merge(limits.team, overrides.get(("team", str(row.id), "")), "team", row.name)
            found += _uses(scope_limits, "team", str(row.id), row.id, used.get(row.id, {}), periods)
    if limits.key is not None or any(key[0] == "key" for key in overrides):
        used = _used(connection, "key_id", periods, team_id)
        for key_row in key_rows:
            prefix = key_format.display_prefix(key_row.id)
            scope_limits = _merge(limits.key, overrides.get(("key", key_row.id, "")), "key", prefix)
            found += _uses(scope_limits, "key", key_row.id, key_row.team_id, used.get(key_row.id, {}), periods)
    if limits.user is not None or any(key[0] == "user" for key in overrides):
        used = _used(connection, "user_id", periods, team_id)
        for user_id in sorted(user_ids):
            name = user_names.get(user_id, str(user_id))
            scope_limits = _merge(limits.user, overrides.get(("user", str(user_id), "")), "user", name)
            found += _uses(scope_limits, "user", str(user_id), None, used.get(user_id, {}), periods)
    return found
