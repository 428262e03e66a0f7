"""GPU chargeback for self-hosted deployments: a worker pool's GPU-hours split across teams by token share.

Under continuous batching a request's wall time is not its share of the GPU: many requests share each step. The
split here is by tokens processed (prompt + completion). Each team's tokens come from the ledger; the workers' own
counters (sampled every minute from vLLM's /metrics) say how many tokens the pool processed in all, so tokens that
did not come through the gateway show up as "unattributed" instead of being silently billed to the teams.
"""

from __future__ import annotations

from collections import defaultdict
from datetime import datetime
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any

import sqlalchemy as sa

from gateway.db.schema import teams, usage, worker_token_samples

UNATTRIBUTED = "(unattributed)"


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
    shares: dict[str, int] = defaultdict(int)
    for team_id, tokens in by_team.items():
        shares[names.get(team_id, str(team_id))] += tokens
    if worker_total > ledger_total:
        shares[UNATTRIBUTED] = worker_total - ledger_total
    rows = []
    for team, tokens in sorted(shares.items()):
        share = Decimal(tokens) / total if total else Decimal(0)
        rows.append(
            {
                "team": team,
                "tokens": tokens,
                "share": str(share.quantize(Decimal("0.000001"), rounding=ROUND_HALF_EVEN)),
                "gpu_hours": str((gpu_hours * share).quantize(Decimal("0.0001"), rounding=ROUND_HALF_EVEN)),
            }
        )
    return rows
