"""GPU chargeback for self-hosted deployments: a worker pool's GPU-hours split across teams by token share.

Under continuous batching a request's wall time is not its share of the GPU: many requests share each step. The
split here is by tokens processed (prompt + completion). Each team's tokens come from the ledger; the workers' own
counters (sampled every minute from vLLM's /metrics) say how many tokens the pool processed in all, so tokens that
did not come through the gateway show up as "unattributed" instead of being silently billed to the teams.
"""

from __future__ import annotations

from datetime import datetime
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any

import sqlalchemy as sa

from gateway.db.schema import teams, usage, worker_token_samples

UNATTRIBUTED = "(unattributed)"
_UNIT = Decimal("0.0001")  # GPU-hours are split to this


def _worker_tokens(connection: sa.Connection, deployment: str, start: datetime, end: datetime) -> int:
    """Tokens the pool's workers processed in [start, end], summing counter increases (a restart resets them)."""
    query = (
        sa.select(worker_token_samples)
        .where(worker_token_samples.c.deployment == deployment)
        .where(worker_token_samples.c.at >= start, worker_token_samples.c.at <= end)
        .order_by(worker_token_samples.c.endpoint, worker_token_samples.c.at)
    )
    previous: dict[str, int] = {}
    total = 0
    for row in connection.execute(query).mappings():
        value = row["prompt_tokens_total"] + row["generation_tokens_total"]
        last = previous.get(row["endpoint"])
        if last is not None:
            total += value - last if value >= last else value  # a reset: the worker restarted from zero
        previous[row["endpoint"]] = value
    return total


def gpu_share(
    engine: sa.Engine, *, deployment: str, start: datetime, end: datetime, gpu_hours: Decimal
) -> list[dict[str, Any]]:
    query = (
        sa.select(usage.c.team_id, sa.func.sum(usage.c.prompt_tokens + usage.c.completion_tokens).label("tokens"))
        .where(usage.c.deployment == deployment, usage.c.started_at >= start, usage.c.started_at < end)
        .group_by(usage.c.team_id)
    )
    with engine.connect() as connection:
        by_team = {row.team_id: int(row.tokens or 0) for row in connection.execute(query)}
        names = dict(connection.execute(sa.select(teams.c.id, teams.c.name)).all())
        worker_total = _worker_tokens(connection, deployment, start, end)
    ledger_total = sum(by_team.values())
    total = max(worker_total, ledger_total)
    # Listed apart from the teams: a team that happened to be named like the unattributed row keeps its own.
    shares = sorted((names.get(team_id, str(team_id)), tokens) for team_id, tokens in by_team.items())
    if worker_total > ledger_total:
        shares.insert(0, (UNATTRIBUTED, worker_total - ledger_total))
    hours = _split(gpu_hours, [tokens for _, tokens in shares], total)
    return [
        {
            "team": team,
            "tokens": tokens,
            "share": str((Decimal(tokens) / (total or 1)).quantize(Decimal("0.000001"), rounding=ROUND_HALF_EVEN)),
            "gpu_hours": str(team_hours),
        }
        for (team, tokens), team_hours in zip(shares, hours, strict=True)
    ]


def _split(gpu_hours: Decimal, tokens: list[int], total: int) -> list[Decimal]:
    """GPU-hours in proportion to tokens, to 0.0001 h, adding up to the whole exactly: each row gets its share
    rounded down, and the units left over go to the largest remainders (an invoice whose lines sum to its total)."""
    if not total:
        return [Decimal(0) * _UNIT for _ in tokens]
    units = int((gpu_hours / _UNIT).to_integral_value(rounding=ROUND_HALF_EVEN))
    exact = [Decimal(units * count) / total for count in tokens]
    shares = [int(value) for value in exact]
    by_remainder = sorted(range(len(tokens)), key=lambda index: exact[index] - shares[index], reverse=True)
    for index in by_remainder[: units - sum(shares)]:
        shares[index] += 1
    return [share * _UNIT for share in shares]
