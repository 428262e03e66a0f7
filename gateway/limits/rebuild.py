"""Budgets rebuilt from the SQL ledger when the limit store has none (a Redis that lost its data, or is new, or
the in-process store after a restart): never reset to zero.

One slot is rebuilt at a time and completely (every key, user and model of the team), because the marker that
says "rebuilt" covers the whole slot. Usage still waiting in a writer's buffer is not in SQL yet and is missed:
at most a few seconds of traffic.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import sqlalchemy as sa

from gateway.db.schema import usage
from gateway.limits.checks import Periods, budget_key
from gateway.utils_time import from_ms

_DAY_TTL_S = 3 * 86_400


def _aggregates(engine: sa.Engine, slot: str, periods: Periods) -> list[Any]:
    today = sa.case((usage.c.started_at >= sa.bindparam("day_start"), 1), else_=0).label("today")
    query = (
        sa.select(
            usage.c.key_id,
            usage.c.user_id,
            usage.c.model,
            today,
            sa.func.sum(usage.c.prompt_tokens + usage.c.completion_tokens).label("tokens"),
            sa.func.sum(usage.c.cost_nanousd).label("cost"),
        )
        .where(usage.c.started_at >= sa.bindparam("month_start"))
        .group_by(usage.c.key_id, usage.c.user_id, usage.c.model, today)
    )
    kind, _, subject = slot.partition(":")
    query = query.where(usage.c.team_id == int(subject)) if kind == "t" else query.where(usage.c.model == subject)
    start = min(periods.month_start, periods.day_start)
    with engine.connect() as connection:
        return list(connection.execute(query, {"day_start": from_ms(periods.day_start), "month_start": from_ms(start)}))


def slot_counters(engine: sa.Engine, slot: str, periods: Periods, now_ms: int) -> list[tuple[str, int, int]]:
    """(key, value, ttl seconds) for every budget counter of the slot, for the current day and month."""
    totals: dict[tuple[str, str, str], int] = defaultdict(int)
    for row in _aggregates(engine, slot, periods):
        key_id, user_id, model, today, tokens, cost = row
        if slot.startswith("t:"):
            labels = ["team", f"key:{key_id}", f"tm:{model}"] + ([f"user:{user_id}"] if user_id is not None else [])
        else:
            labels = ["model"]
        for label in labels:
            for what, amount in (("bt", int(tokens or 0)), ("bc", int(cost or 0))):
                totals[(label, what, periods.month_id)] += amount
                if today:
                    totals[(label, what, periods.day_id)] += amount
    month_ttl = periods.month_ttl_s(now_ms)
    return [
        (budget_key(slot, label, what, period), value, _DAY_TTL_S if period.startswith("d") else month_ttl)
        for (label, what, period), value in totals.items()
    ]
