"""The admin API's plumbing: an endpoint registry (which the OpenAPI document is built from), authentication of
every call, body validation, and running SQL off the event loop in one transaction per change."""

from __future__ import annotations

import functools
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Concatenate, ParamSpec, TypeVar

import orjson
import sqlalchemy as sa
from aiohttp import web
from pydantic import BaseModel, ValidationError

from gateway import metrics
from gateway.admin.principal import Principal, authenticate, config_key_hashes
from gateway.auth.store import bearer_token
from gateway.context import REQUEST_ID
from gateway.errors import InvalidRequest
from gateway.state import STATE, GatewayState

P = ParamSpec("P")
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Param:
    name: str
    description: str
    enum: tuple[str, ...] | None = None
    type: str = "string"


@dataclass(frozen=True, slots=True)
class Endpoint:
    method: str
    path: str
    handler: Callable[[Call], Awaitable[web.StreamResponse]]
    summary: str
    tag: str
    org_only: bool = False
    body: type[BaseModel] | None = None
    query: tuple[Param, ...] = ()
    status: int = 200
    produces_csv: bool = False

    @property
    def operation_id(self) -> str:
        return self.handler.__name__


ENDPOINTS: list[Endpoint] = []


def endpoint(
    method: str,
    path: str,
    *,
    summary: str,
    tag: str,
    org_only: bool = False,
    body: type[BaseModel] | None = None,
    query: tuple[Param, ...] = (),
    status: int = 200,
    produces_csv: bool = False,
) -> Callable[[Callable[[Call], Awaitable[web.StreamResponse]]], Callable[[Call], Awaitable[web.StreamResponse]]]:
    def register(
        handler: Callable[[Call], Awaitable[web.StreamResponse]],
    ) -> Callable[[Call], Awaitable[web.StreamResponse]]:
        ENDPOINTS.append(Endpoint(method, path, handler, summary, tag, org_only, body, query, status, produces_csv))
        return handler

    return register


@dataclass(slots=True)
class Call:
    """One admin API call: who makes it, its validated body, and SQL helpers that never block the event loop."""

    request: web.Request
    state: GatewayState
    principal: Principal
    body: Any = None
    _started: float = field(default_factory=time.perf_counter)

    @property
    def request_id(self) -> str:
        return str(self.request[REQUEST_ID])

    def match(self, name: str) -> str:
        return self.request.match_info[name]

    def arg(self, name: str) -> str | None:
        value = self.request.query.get(name)
        return value if value else None

    async def read(self, func: Callable[Concatenate[sa.Connection, P], T], *args: P.args, **kwargs: P.kwargs) -> T:
        return await self.state.sql.run(functools.partial(_read, self.state.sql.engine, func, *args, **kwargs))

    async def write(self, func: Callable[Concatenate[sa.Connection, P], T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run a change and its audit row in one transaction."""
        return await self.state.sql.run(functools.partial(_write, self.state.sql.engine, func, *args, **kwargs))


def _read(engine: sa.Engine, func: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    with engine.connect() as connection:
        return func(connection, *args, **kwargs)


def _write(engine: sa.Engine, func: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    with engine.begin() as connection:
        return func(connection, *args, **kwargs)


def _default(value: Any) -> Any:
    if isinstance(value, Decimal):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def json_response(data: Any, *, status: int = 200) -> web.Response:
    return web.Response(
        status=status,
        body=orjson.dumps(data, default=_default, option=orjson.OPT_UTC_Z | orjson.OPT_NON_STR_KEYS),
        content_type="application/json",
    )


CONFIG_HASHES = web.AppKey("admin_config_key_hashes", list)


async def principal_of(request: web.Request) -> Principal:
    state = request.app[STATE]
    raw = bearer_token(request.headers.get("Authorization"))
    return await state.sql.run(_read, state.sql.engine, authenticate, state.pepper, request.app[CONFIG_HASHES], raw)


def _validate(model: type[BaseModel], raw: bytes) -> BaseModel:
    try:
        return model.model_validate_json(raw or b"{}")
    except ValidationError as exc:
        first = exc.errors()[0]
        location = ".".join(str(part) for part in first["loc"]) or None
        raise InvalidRequest(f"{location or 'body'}: {first['msg']}", param=location) from None


def wrap(spec: Endpoint) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """The aiohttp handler of an endpoint: authenticate (401/403), validate the body (400), run, count."""

    async def handle(request: web.Request) -> web.StreamResponse:
        status = 500
        try:
            state = request.app[STATE]
            principal = await principal_of(request)
            if spec.org_only:
                principal.require_org_admin(spec.summary[0].lower() + spec.summary[1:].rstrip("."))
            call = Call(request, state, principal)
            if spec.body is not None:
                call.body = _validate(spec.body, await request.read())
            response = await spec.handler(call)
            status = response.status
            return response
        except Exception as exc:
            status = getattr(exc, "status", 500)
            raise
        finally:
            metrics.ADMIN_REQUESTS.labels(spec.operation_id, str(status)).inc()

    return handle


def config_hashes(state: GatewayState) -> list[bytes]:
    return config_key_hashes(state.pepper, state.settings.admin.keys)
