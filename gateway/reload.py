"""Configuration reload on SIGHUP, without dropping requests.

What a reload changes: models, deployments, prices, aliases, groups, routing settings and the default limits.
Deployments whose settings did not change keep their state (health, breakers, load, connections); new ones get a
connection pool; removed or changed ones stop taking new requests and their pools close once the requests still
on them have finished. What needs a restart (and is refused with a log line): the listen address, the database,
Redis, the pepper, the ledger buffer settings.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from aiohttp import web

from gateway.metering.prices import seed_prices
from gateway.routing.table import RouteTable
from gateway.settings import Settings, SettingsError, load_settings
from gateway.snapshot import bump_version
from gateway.state import STATE
from gateway.upstream.pool import forget_ssl_contexts, missing_api_keys

log = logging.getLogger(__name__)

_RESTART_ONLY = ("listen", "database", "redis", "auth", "metering", "server")


def _seed(settings: Settings, engine: object) -> None:
    with engine.begin() as connection:  # type: ignore[attr-defined]
        if seed_prices(connection, settings):
            bump_version(connection)


async def reload_config(app: web.Application, path: str | Path) -> bool:
    state = app[STATE]
    try:
        settings = await asyncio.to_thread(load_settings, path)
    except SettingsError as exc:
        log.error("configuration not reloaded: %s", exc)
        return False
    settings = settings.model_copy(update={"listen": state.settings.listen})  # keep command-line overrides
    changed = [name for name in _RESTART_ONLY if getattr(settings, name) != getattr(state.settings, name)]
    if changed:
        log.error("configuration not reloaded: %s can only change with a restart", ", ".join(changed))
        return False
    missing = missing_api_keys(settings)
    if missing:
        log.error("configuration not reloaded: %s", "; ".join(missing))
        return False
    forget_ssl_contexts()
    routes = RouteTable(settings, created=state.routes.created, previous=state.routes)
    await state.pool.sync(routes.deployments(), grace=settings.server.shutdown_grace)
    routes.apply_drains(state.snapshot.current.drains)
    state.routes = routes
    await asyncio.to_thread(state.monitor.resolve_proxies)
    state.settings = settings
    state.limiter.reconfigure(settings.limits)
    try:
        await state.sql.run(_seed, settings, state.sql.engine)
    except Exception as exc:  # prices are seeded again at the next start
        log.warning("reloaded, but the new prices could not be written: %s", type(exc).__name__)
    log.info("configuration reloaded", extra={"models": len(routes.models), "deployments": len(routes.deployments())})
    return True
