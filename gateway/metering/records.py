"""Turning a finished request's context into its ledger row."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from gateway.context import RequestContext
from gateway.metering.cost import TokenCounts, cost_nanousd
from gateway.metering.prices import PriceBook


def usage_row(ctx: RequestContext, prices: PriceBook) -> dict[str, Any]:
    usage = ctx.usage
    deployment = ctx.deployment
    # Priced at the deployment that served (a fallback may serve another model than the one requested).
    served = deployment.model if deployment else ctx.model
    price = prices.lookup(served, deployment.name if deployment else None, ctx.started_wall)
    cost = 0
    if price is not None:
        cost = cost_nanousd(
            TokenCounts(
                prompt=usage.prompt_tokens,
                completion=usage.completion_tokens,
                cached_prompt=usage.cached_prompt_tokens,
            ),
            price,
        )
    key = ctx.key
    started = usage_started_at(ctx)
    first_token_ms, duration_ms = ctx.first_token_ms, ctx.duration_ms
    return {
        "request_id": ctx.request_id,
        "started_at": started,
        "client_request_id": ctx.client_request_id,
        "endpoint": ctx.endpoint,
        "key_id": key.key_id if key else None,
        "team_id": key.team_id if key else None,
        "user_id": key.user_id if key else None,
        "end_user": ctx.end_user,
        "model": ctx.model,
        "deployment": deployment.name if deployment else None,
        "upstream_model": deployment.upstream_model if deployment else None,
        "prompt_tokens": usage.prompt_tokens,
        "cached_prompt_tokens": usage.cached_prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "reasoning_tokens": usage.reasoning_tokens,
        "usage_source": usage.source,
        "cost_nanousd": cost,
        "price_id": price.price_id if price else None,
        "status_code": ctx.status,
        "error_type": ctx.error_type,
        "finish_reason": ctx.finish_reason,
        "streamed": ctx.stream,
        "client_disconnected": ctx.client_disconnected,
        "first_token_ms": first_token_ms,
        "duration_ms": duration_ms,
        "tags": list(key.tags) if key and key.tags else None,
        "first_token_at": started + timedelta(milliseconds=first_token_ms) if first_token_ms is not None else None,
        "ended_at": started + timedelta(milliseconds=duration_ms),
        "queue_ms": ctx.queue_ms,
    }


def usage_started_at(ctx: RequestContext) -> datetime:
    return datetime.fromtimestamp(ctx.started_wall, UTC)


_TIMES = ("started_at", "first_token_at", "ended_at")


def encode(row: dict[str, Any]) -> bytes:
    """A ledger row as the bytes the durable buffers (Redis stream, spool) hold."""
    return orjson.dumps(row)


def decode(data: bytes) -> dict[str, Any]:
    row: dict[str, Any] = orjson.loads(data)
    row["request_id"] = uuid.UUID(row["request_id"])
    for name in _TIMES:
        if row.get(name) is not None:
            row[name] = datetime.fromisoformat(row[name])
    return row
