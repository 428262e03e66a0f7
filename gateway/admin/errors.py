"""Admin errors, in the gateway's OpenAI shape (they are `GatewayError`s, so the errors middleware renders them).

GatewayError
├── Forbidden (403 permission_denied)    authenticated, but this role may not do that
├── AdminNotFound (404 not_found)        no such team, user, key, ...
└── Conflict (409 conflict)              the name exists already, the key is already revoked, ...
"""

from __future__ import annotations

from gateway.errors import GatewayError, NotFound


class Forbidden(GatewayError):
    status = 403
    type = "invalid_request_error"
    code = "permission_denied"


class AdminNotFound(NotFound):
    pass


class Conflict(GatewayError):
    status = 409
    type = "invalid_request_error"
    code = "conflict"
