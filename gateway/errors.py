"""Every error a client can see, in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.

    GatewayError (500 server_error)               the root; unexpected failures are shown generically
    ├── InvalidRequest (400 invalid_request_error)
    │   ├── BodyTooLarge (413)
    │   └── UnsupportedMediaType (415)
    ├── AuthenticationFailed (401 invalid_api_key)
    ├── ModelNotAllowed (403 model_not_allowed)
    ├── NotFound (404)
    │   └── ModelNotFound (404 model_not_found)
    ├── MethodNotAllowed (405)
    ├── RateLimited (429 rate_limit_exceeded)
    │   └── QuotaExceeded (429 insufficient_quota)
    ├── ServiceUnavailable (503)
    ├── UpstreamUnreachable (502)
    ├── UpstreamTimeout (504)
    └── UpstreamError (the upstream's own status, its message normalised)

Each class carries its HTTP status and OpenAI error type, so raising is all a stage has to do.
"""

from __future__ import annotations

from typing import Any

import orjson


class GatewayError(Exception):
    status = 500
    type = "server_error"
    code: str | None = None
    # Only messages of user-facing errors reach clients; anything else is replaced by a generic one.
    user_facing = True

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def to_json(self) -> bytes:
        return orjson.dumps(self.body())


class InvalidRequest(GatewayError):
    status = 400
    type = "invalid_request_error"


class BodyTooLarge(InvalidRequest):
    status = 413
    code = "request_too_large"


class UnsupportedMediaType(InvalidRequest):
    status = 415


class AuthenticationFailed(GatewayError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class ModelNotAllowed(GatewayError):
    status = 403
    type = "invalid_request_error"
    code = "model_not_allowed"


class NotFound(GatewayError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"


class MethodNotAllowed(GatewayError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


class RateLimited(GatewayError):
    status = 429
    type = "requests"
    code = "rate_limit_exceeded"


class QuotaExceeded(RateLimited):
    type = "insufficient_quota"
    code = "insufficient_quota"


class ServiceUnavailable(GatewayError):
    status = 503
    type = "server_error"
    code = "service_unavailable"


class UpstreamUnreachable(GatewayError):
    status = 502
    type = "server_error"
    code = "upstream_unreachable"


class UpstreamTimeout(GatewayError):
    status = 504
    type = "server_error"
    code = "upstream_timeout"


class UpstreamError(GatewayError):
    """An error answer from the upstream, passed on with its status in OpenAI's shape."""

    def __init__(self, status: int, message: str, *, type_: str, param: str | None, code: Any) -> None:
        super().__init__(message, param=param)
        self.status = status
        self.type = type_
        self.code = code


class InternalError(GatewayError):
    user_facing = False
