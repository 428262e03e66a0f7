"""Translating what goes wrong upstream into the gateway's errors, at the boundary.

Upstream error bodies come in several shapes (OpenAI's `{"error": {...}}`, older vLLM's flat
`{"object": "error", ...}`, FastAPI's `{"detail": ...}`, plain text); clients always get OpenAI's shape.
An upstream 401/403 means the *gateway's* credentials were refused: the client sees a 502, never a 401 that
would make it think its own key is wrong.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import aiohttp
import orjson

from gateway.errors import UpstreamError, UpstreamTimeout, UpstreamUnreachable

_TYPES_BY_STATUS = {
    400: "invalid_request_error",
    404: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_exceeded",
}
_PASSED_HEADERS = ("retry-after", "retry-after-ms")


@contextlib.contextmanager
def translate_errors(model: str) -> Iterator[None]:
    """Map aiohttp and timeout failures of an upstream call to 502/504 without leaking URLs or keys."""
    try:
        yield
    except TimeoutError as exc:  # aiohttp's timeouts subclass TimeoutError
        raise UpstreamTimeout(f"The upstream serving model '{model}' did not answer in time.") from exc
    except aiohttp.ClientError as exc:
        raise UpstreamUnreachable(f"The upstream serving model '{model}' could not be reached.") from exc


def _text(value: Any) -> str | None:
    if value is None:
        return None
    return value if isinstance(value, str) else str(value)


def error_from_upstream(status: int, body: bytes, headers: Any, model: str) -> UpstreamError:
    message: str | None = None
    err_type: str | None = None
    param: str | None = None
    code: Any = None
    try:
        parsed = orjson.loads(body) if body else None
    except orjson.JSONDecodeError:
        parsed = None
    if isinstance(parsed, dict):
        inner = parsed.get("error")
        source = inner if isinstance(inner, dict) else parsed
        message = _text(source.get("message")) or (_text(inner) if isinstance(inner, str) else None)
        message = message or _text(parsed.get("detail"))
        err_type = _text(source.get("type"))
        param = _text(source.get("param"))
        code = source.get("code")
    elif body:
        message = body[:500].decode(errors="replace").strip()

    # 407: a forward proxy refused the gateway. Neither is the client's fault, nor its key.
    if status in (401, 403, 407):
        error = UpstreamError(
            502,
            f"The upstream serving model '{model}' refused the gateway's credentials.",
            type_="server_error",
            param=None,
            code="upstream_auth_failed",
        )
        return error
    if not isinstance(code, str | int) or isinstance(code, bool):
        code = None
    # vLLM reports Python exception names as the type; clients expect OpenAI's vocabulary.
    openai_type = _TYPES_BY_STATUS.get(status, "server_error" if status >= 500 else "invalid_request_error")
    if err_type and err_type.islower():
        openai_type = err_type
    error = UpstreamError(
        status,
        message or f"The upstream serving model '{model}' answered with status {status}.",
        type_=openai_type,
        param=param,
        code=code if code is not None and code != status else None,
    )
    for name in _PASSED_HEADERS:
        value = headers.get(name)
        if value is not None:
            error.headers[name] = value
    return error
