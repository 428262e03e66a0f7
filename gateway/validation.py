"""Reading a request body: JSON, the right types for the fields the gateway acts on, nothing more.

Every other field is the upstream's business and passes through untouched; the gateway only needs the model,
whether to stream, the client's usage wish, `max_tokens` (for limits) and `user` (for the ledger).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from gateway.errors import InvalidRequest

CHAT = "chat"
COMPLETIONS = "completions"
EMBEDDINGS = "embeddings"

UPSTREAM_PATHS = {CHAT: "/chat/completions", COMPLETIONS: "/completions", EMBEDDINGS: "/embeddings"}
_REQUIRED = {CHAT: "messages", COMPLETIONS: "prompt", EMBEDDINGS: "input"}


@dataclass(slots=True)
class Call:
    payload: dict[str, Any]
    model: str
    stream: bool
    include_usage: bool
    max_tokens: int | None
    end_user: str | None


def _type_error(field: str, expected: str) -> InvalidRequest:
    return InvalidRequest(f"Invalid type for '{field}': expected {expected}.", param=field, code="invalid_type")


def parse_call(endpoint: str, body: bytes) -> Call:
    if not body:
        raise InvalidRequest("The request body is empty; expected a JSON object.", code="invalid_json")
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"The request body is not valid JSON: {exc.msg}.", code="invalid_json") from None
    if not isinstance(payload, dict):
        raise InvalidRequest("The request body must be a JSON object.", code="invalid_json")

    model = payload.get("model")
    if model is None:
        raise InvalidRequest("You must provide a model parameter.", param="model", code="missing_required_parameter")
    if not isinstance(model, str) or not model:
        raise _type_error("model", "a non-empty string")

    required = _REQUIRED[endpoint]
    value = payload.get(required)
    if value is None:
        raise InvalidRequest(
            f"Missing required parameter: '{required}'.", param=required, code="missing_required_parameter"
        )
    if endpoint == CHAT and not isinstance(value, list):
        raise _type_error("messages", "an array of message objects")
    if endpoint == CHAT and not all(isinstance(message, dict) for message in value):
        raise _type_error("messages", "an array of message objects")
    if endpoint != CHAT and not isinstance(value, str | list):
        raise _type_error(required, "a string or an array")

    stream = payload.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise _type_error("stream", "a boolean")
    if stream and endpoint == EMBEDDINGS:
        raise InvalidRequest("Embeddings cannot be streamed.", param="stream", code="invalid_value")

    options = payload.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise _type_error("stream_options", "an object")
    include_usage = bool(options and options.get("include_usage") is True)

    # max_completion_tokens supersedes max_tokens; a null one falls back to the other, as servers do.
    field = "max_completion_tokens" if payload.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = payload.get(field)
    if max_tokens is not None and (not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 0):
        raise _type_error(field, "a non-negative integer")

    end_user = payload.get("user")
    if end_user is not None and not isinstance(end_user, str):
        raise _type_error("user", "a string")

    return Call(
        payload=payload,
        model=model,
        stream=stream,
        include_usage=include_usage,
        max_tokens=max_tokens,
        end_user=end_user[:256] if end_user else None,
    )
