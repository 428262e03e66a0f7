"""Cross-cutting work only: the request id and OpenAI-shaped errors. The pipeline itself is in `proxy`."""

from __future__ import annotations

import logging

import sqlalchemy as sa
from aiohttp import web
from aiohttp.typedefs import Handler

from gateway.context import REQUEST_ID
from gateway.errors import (
    BodyTooLarge,
    GatewayError,
    InternalError,
    InvalidRequest,
    MethodNotAllowed,
    NotFound,
    ServiceUnavailable,
)
from gateway.ids import uuid7
from gateway.proxy import response_headers

log = logging.getLogger(__name__)


def error_response(request: web.Request, error: GatewayError) -> web.Response:
    headers = response_headers(request)
    headers.update(error.headers)
    return web.Response(status=error.status, body=error.to_json(), content_type="application/json", headers=headers)


def _from_http_exception(exc: web.HTTPException) -> GatewayError:
    if exc.status == 404:
        return NotFound("Unknown request URL. Please check the URL and method.")
    if exc.status == 405:
        return MethodNotAllowed("This method is not allowed for this URL.")
    if exc.status == 413:
        return BodyTooLarge("The request body is larger than this gateway accepts.")
    error = InvalidRequest(exc.reason or "Bad request.")
    error.status = exc.status
    return error


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    request[REQUEST_ID] = uuid7()
    try:
        return await handler(request)
    except GatewayError as exc:
        if not exc.user_facing:
            log.error("internal error", exc_info=exc, extra={"request_id": str(request[REQUEST_ID])})
            exc = InternalError(f"The gateway failed to handle the request (request id {request[REQUEST_ID]}).")
        return error_response(request, exc)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return error_response(request, _from_http_exception(exc))
    except ConnectionResetError:
        transport = request.transport
        if transport is not None and not transport.is_closing():
            raise
        # The client hung up (the request was finalised already). Re-raised, aiohttp would log it as an error
        # with a traceback; this response is never sent, and aiohttp drops it quietly on the closed transport.
        return web.Response(status=499)
    except (sa.exc.OperationalError, sa.exc.TimeoutError) as exc:
        # The database is down, unreachable or (SQLite) locked past the busy timeout: only SQL-backed calls (admin
        # API, dashboard, usage reports) get here, never the proxy's hot path. The message may name hosts: not
        # logged, and never sent to the client.
        log.warning(
            "database unavailable: %s",
            type(getattr(exc, "orig", exc)).__name__,
            extra={"request_id": str(request[REQUEST_ID])},
        )
        unavailable = ServiceUnavailable(
            "The gateway's database is unavailable or busy; retry shortly.", headers={"retry-after": "2"}
        )
        return error_response(request, unavailable)
    except Exception:
        log.exception("unhandled error", extra={"request_id": str(request[REQUEST_ID])})
        error = InternalError(f"The gateway failed to handle the request (request id {request[REQUEST_ID]}).")
        return error_response(request, error)
