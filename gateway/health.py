"""Liveness, readiness and metrics endpoints (public: no API key)."""

from __future__ import annotations

import orjson
from aiohttp import web

from gateway import metrics
from gateway.state import STATE
from gateway.tally import TALLY


async def health(request: web.Request) -> web.Response:
    return web.Response(body=b'{"status":"ok"}', content_type="application/json")


async def ready(request: web.Request) -> web.Response:
    """Ready when the key snapshot is loaded. A database outage alone does not make a replica unready: keys are
    served from the snapshot and usage is buffered; it is reported here and in metrics."""
    state = request.app[STATE]
    database_up = state.snapshot.database_healthy
    redis = state.limiter.store_status
    # Unready only when requests would be refused: no key snapshot, or Redis down in fail-closed mode.
    can_serve = state.snapshot.ready and (redis != "down" or state.settings.redis.fail_open)
    body = {
        "ready": can_serve,
        "database": "up" if database_up else "down",
        "redis": redis,
        "snapshot_version": state.snapshot.current.version if state.snapshot.ready else None,
        "usage_backlog": state.ledger.stream_backlog,
        "usage_spool_bytes": state.ledger.spool_bytes,
    }
    return web.Response(status=200 if can_serve else 503, body=orjson.dumps(body), content_type="application/json")


async def prometheus(request: web.Request) -> web.Response:
    state = request.app[STATE]
    metrics.DATABASE_UP.set(1 if state.snapshot.database_healthy else 0)
    TALLY.flush()  # what this worker tallied since the last second (other workers flush on their own)
    body, content_type = metrics.render()
    response = web.Response(body=body)
    response.headers["Content-Type"] = content_type
    return response
