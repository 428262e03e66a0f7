"""`GET /v1/models`: the models the caller's key may use, in OpenAI's list shape."""

from __future__ import annotations

import orjson
from aiohttp import web

from gateway.auth.store import KeyRecord, authenticate, bearer_token
from gateway.errors import ModelNotFound
from gateway.proxy import response_headers
from gateway.state import STATE


def _caller(request: web.Request) -> KeyRecord:
    state = request.app[STATE]
    return authenticate(state.snapshot.current.keys, state.pepper, bearer_token(request.headers.get("Authorization")))


def _model_object(name: str, created: int) -> dict[str, object]:
    return {"id": name, "object": "model", "created": created, "owned_by": "gateway"}


async def list_models(request: web.Request) -> web.Response:
    key = _caller(request)
    routes = request.app[STATE].routes
    data = [_model_object(name, routes.created) for name in routes.public_names() if key.may_use(name)]
    return web.Response(
        body=orjson.dumps({"object": "list", "data": data}),
        content_type="application/json",
        headers=response_headers(request),
    )


async def retrieve_model(request: web.Request) -> web.Response:
    key = _caller(request)
    name = request.match_info["model"]
    routes = request.app[STATE].routes
    if not routes.exists(name) or not key.may_use(name):
        raise ModelNotFound(f"The model '{name}' does not exist or you do not have access to it.", param="model")
    return web.Response(
        body=orjson.dumps(_model_object(name, routes.created)),
        content_type="application/json",
        headers=response_headers(request),
    )
