"""The admin HTTP API under `/admin/` (teams, users, keys, limits, prices, usage, audit, alerts) and its OpenAPI
document at `/admin/openapi.json`. See `principal` for the two roles, `audit` for the change log."""

from __future__ import annotations

from aiohttp import web

from gateway.state import GatewayState


def setup(app: web.Application, state: GatewayState) -> None:
    """Register the admin routes. Every route needs an admin credential except the OpenAPI document."""
    import orjson

    from gateway.admin import api, deployments  # noqa: F401 - registers the endpoints
    from gateway.admin.openapi import document
    from gateway.admin.routing import CONFIG_HASHES, ENDPOINTS, config_hashes, wrap

    app[CONFIG_HASHES] = config_hashes(state)
    body = orjson.dumps(document())

    async def openapi(_request: web.Request) -> web.Response:
        return web.Response(body=body, content_type="application/json")

    app.router.add_get("/admin/openapi.json", openapi)
    for spec in ENDPOINTS:
        app.router.add_route(spec.method, spec.path, wrap(spec))
