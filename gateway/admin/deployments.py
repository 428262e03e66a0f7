"""Routing state and draining, for organisation admins.

`GET /admin/deployments` shows what this process knows of every deployment and worker: health, breaker, load
figures scraped from vLLM, requests in flight, queue depth. Tests and operators wait on it instead of guessing.
Draining (a whole deployment, or one worker) is stored in SQL and reaches every gateway process through the
shared cache version: no new requests go there, in-flight ones (streams included) finish.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from aiohttp import web
from pydantic import BaseModel, Field

from gateway.admin import audit
from gateway.admin.errors import AdminNotFound
from gateway.admin.principal import Principal
from gateway.admin.routing import Call, endpoint, json_response
from gateway.db.engine import utcnow
from gateway.db.schema import deployment_drains
from gateway.routing.choice import expected_load
from gateway.routing.table import DeploymentRuntime, Endpoint
from gateway.snapshot import bump_version


class DrainBody(BaseModel):
    endpoint: str | None = Field(None, description="one worker's base URL; omit to drain the whole deployment")


def _endpoint_state(endpoint: Endpoint) -> dict[str, Any]:
    return {
        "base_url": endpoint.base_url,
        "healthy": endpoint.healthy,
        "breaker": endpoint.breaker.state.value,
        "drained": endpoint.drained,
        "outstanding": endpoint.outstanding,
        "sent_since_scrape": endpoint.sent_since_scrape,
        "running": endpoint.running,
        "waiting": endpoint.waiting,
        "kv_cache_usage": endpoint.kv_cache_usage,
        "prefix_cache_hit_rate": endpoint.prefix_cache_hit_rate,
        "scraped_at": endpoint.scraped_at or None,
        "expected_load": expected_load(endpoint),
    }


def _deployment_state(deployment: DeploymentRuntime, queue_depth: int) -> dict[str, Any]:
    return {
        "name": deployment.name,
        "model": deployment.model,
        "kind": deployment.config.kind,
        "weight": deployment.config.weight,
        "max_concurrency": deployment.config.max_concurrency,
        "in_flight": deployment.in_flight,
        "draining": deployment.draining,
        "queue_depth": queue_depth,
        "endpoints": [_endpoint_state(endpoint) for endpoint in deployment.endpoints],
    }


@endpoint(
    "GET",
    "/admin/deployments",
    summary="Routing state of every deployment (this process).",
    tag="routing",
    org_only=True,
)
async def list_deployments(call: Call) -> web.StreamResponse:
    state = call.state
    data = [
        _deployment_state(deployment, state.dispatcher.queue_depth(deployment.model))
        for deployment in state.routes.deployments()
    ]
    return json_response({"data": data})


def _find(call: Call) -> DeploymentRuntime:
    name = call.match("deployment")
    for deployment in call.state.routes.deployments():
        if deployment.name == name:
            return deployment
    raise AdminNotFound(f"No deployment named '{name}'.")


def _set_drain(
    connection: sa.Connection, principal: Principal, deployment: str, endpoint_url: str, drain: bool, request_id: str
) -> bool:
    key = (deployment_drains.c.deployment == deployment) & (deployment_drains.c.endpoint == endpoint_url)
    existing = connection.execute(sa.select(deployment_drains.c.deployment).where(key)).first() is not None
    if drain and not existing:
        connection.execute(
            deployment_drains.insert().values(
                deployment=deployment, endpoint=endpoint_url, drained_at=utcnow(), actor=principal.actor
            )
        )
    elif not drain and existing:
        connection.execute(deployment_drains.delete().where(key))
    else:
        return False
    bump_version(connection)
    target = f"deployment:{deployment}" + (f"@{endpoint_url}" if endpoint_url else "")
    audit.record(
        connection,
        principal,
        "drain" if drain else "undrain",
        target,
        team_id=None,
        before={"drained": existing},
        after={"drained": drain},
        request_id=request_id,
    )
    return True


async def _change(call: Call, drain: bool) -> web.StreamResponse:
    deployment = _find(call)
    endpoint_url = (call.body.endpoint or "").rstrip("/")
    if endpoint_url and endpoint_url not in {endpoint.base_url for endpoint in deployment.endpoints}:
        raise AdminNotFound(f"Deployment '{deployment.name}' has no worker at {endpoint_url}.")
    changed = await call.write(_set_drain, call.principal, deployment.name, endpoint_url, drain, call.request_id)
    return json_response(
        {"deployment": deployment.name, "endpoint": endpoint_url or None, "drained": drain, "changed": changed}
    )


@endpoint(
    "POST",
    "/admin/deployments/{deployment}/drain",
    summary="Drain a deployment or one worker.",
    tag="routing",
    org_only=True,
    body=DrainBody,
)
async def drain_deployment(call: Call) -> web.StreamResponse:
    return await _change(call, True)


@endpoint(
    "POST",
    "/admin/deployments/{deployment}/undrain",
    summary="Put a drained deployment or worker back.",
    tag="routing",
    org_only=True,
    body=DrainBody,
)
async def undrain_deployment(call: Call) -> web.StreamResponse:
    return await _change(call, False)
