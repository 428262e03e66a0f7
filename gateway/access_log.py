"""The access log: one structured JSON line per finished request on the `gateway.access` logger.

What it holds: the gateway and client request ids, team, key prefix (the public id: never the secret), user, model,
deployment, tokens, cost, status, error type, latency. What it never holds: API keys, authorization headers, and
the request's messages unless the operator opts in (`logging.log_prompts`). Completions are never kept by the
gateway, so they are never logged. Called once per admitted request, from the request's finalisation, with the
ledger row it produced, so the log and the ledger agree.
"""

from __future__ import annotations

import logging
from typing import Any

from gateway.context import RequestContext
from gateway.logs import write_info
from gateway.settings import Logging

log = logging.getLogger("gateway.access")

_enabled = True
_log_prompts = False
_PROMPT_FIELDS = ("messages", "prompt", "input")


def configure(settings: Logging) -> None:
    global _enabled, _log_prompts
    _enabled = settings.access_log
    _log_prompts = settings.log_prompts


def access_entry(ctx: RequestContext, row: dict[str, Any], *, log_prompts: bool = False) -> dict[str, Any]:
    key = ctx.key
    entry: dict[str, Any] = {
        "request_id": ctx.request_id_text,
        "client_request_id": ctx.client_request_id,
        "endpoint": ctx.endpoint,
        "team": key.team_name if key else None,
        "key": key.display_prefix if key else None,
        "user": key.user_name if key else None,
        "end_user": ctx.end_user,
        "model": ctx.model,
        "deployment": row.get("deployment"),
        "upstream_model": row.get("upstream_model"),
        "status": ctx.status,
        "error_type": ctx.error_type,
        "finish_reason": ctx.finish_reason,
        "stream": ctx.stream,
        "client_disconnected": ctx.client_disconnected,
        "prompt_tokens": row.get("prompt_tokens", 0),
        "cached_prompt_tokens": row.get("cached_prompt_tokens", 0),
        "completion_tokens": row.get("completion_tokens", 0),
        "usage_source": row.get("usage_source"),
        "cost_nanousd": row.get("cost_nanousd", 0),
        "latency_ms": round(ctx.duration_ms, 3),
        "ttft_ms": round(ctx.first_token_ms, 3) if ctx.first_token_ms is not None else None,
    }
    if log_prompts and ctx.payload is not None:
        entry["request_body"] = {name: ctx.payload[name] for name in _PROMPT_FIELDS if name in ctx.payload}
    return entry


def log_access(ctx: RequestContext, row: dict[str, Any]) -> None:
    """Write the request's access line. Cheap (one dict, one formatted line); never raises into the caller."""
    if not _enabled:
        return
    try:
        write_info(log, "request", access_entry(ctx, row, log_prompts=_log_prompts))
    except Exception:  # a logging failure must never affect the request's finalisation
        log.exception("access log entry failed")
