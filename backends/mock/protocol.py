"""Request parsing and errors, in the shape of vLLM 0.32's OpenAI server.

vLLM answers a bad request in two ways, and the mock copies both:

* the request does not fit the request model (pydantic, lax mode: ``"3"`` is a fine integer, ``"yes"`` a
  fine boolean): 400, ``type: "Bad Request"``, ``param`` the first error's location (``"body.max_tokens"``),
  and a message listing the errors (``"1 validation error:\\n  {'type': 'int_parsing', ...}"``);
* vLLM's own checks afterwards: 400 ``BadRequestError`` with vLLM's wording, ``param`` the bare field name
  (or null) and ``" (parameter=max_tokens, value=5000)"`` at the end of the message; an unknown model is a
  404 ``NotFoundError`` that lists the served names.

The checks run in vLLM's order: media type, JSON, field types, ``stream_options`` without ``stream``, model,
``max_tokens`` above ``max_model_len``, an empty conversation or prompt, a prompt longer than the context,
``n``, and the ``max_tokens`` left once the prompt is in the context (a request asking for more than what is
left gets what is left, as in vLLM 0.32: no error). Only the fields the mock reads are validated; unknown
fields (``logprobs``, ``tools``, ``stop``, ...) are accepted and ignored, as a real server would accept them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import orjson
from aiohttp import web

from .config import MockConfig
from .tokenizer import chat_prompt_text, chat_prompt_tokens, count_prompt, prompt_tokens

__all__ = [
    "VLLM_VERSION",
    "ApiError",
    "EmbeddingRequest",
    "GenerationRequest",
    "check_media_type",
    "error_body",
    "error_response",
    "parse_chat",
    "parse_completion",
    "parse_embedding",
    "parse_json",
    "parse_tokenize",
]

#: The vLLM release whose wire format the mock follows (``system_fingerprint`` names it).
VLLM_VERSION = "0.32.0"

# The ``type`` vLLM (and the openai SDK's exception classes) use for each status.
_ERROR_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    403: "PermissionDeniedError",
    404: "NotFoundError",
    409: "ConflictError",
    422: "UnprocessableEntityError",
    429: "RateLimitError",
    500: "InternalServerError",
    501: "NotImplementedError",
    502: "BadGatewayError",
    503: "ServiceUnavailableError",
    504: "GatewayTimeoutError",
}
#: The ``type`` of a request-validation (pydantic) error: the status phrase, as vLLM's handler writes it.
VALIDATION_ERROR_TYPE = HTTPStatus.BAD_REQUEST.phrase

_JSON = "application/json"
#: vLLM's default ``max_tokens`` for the legacy completions API (OpenAI's default too).
COMPLETIONS_DEFAULT_MAX_TOKENS = 16
_INT64_MIN = -(2**63)
_INT64_MAX = 2**63 - 1


def error_type(status: int) -> str:
    known = _ERROR_TYPES.get(status)
    if known is not None:
        return known
    try:
        return HTTPStatus(status).phrase.replace(" ", "").replace("-", "") + "Error"
    except ValueError:
        return "Error"


def error_body(status: int, message: str, err_type: str | None = None, param: str | None = None) -> bytes:
    """vLLM's current error body: ``{"error": {"message", "type", "param", "code"}}``."""
    return orjson.dumps(
        {
            "error": {
                "message": message,
                "type": err_type or error_type(status),
                "param": param,
                "code": status,
            }
        }
    )


def error_response(
    status: int,
    message: str,
    err_type: str | None = None,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    return web.Response(
        status=status, body=error_body(status, message, err_type, param), content_type=_JSON, headers=headers
    )


class ApiError(Exception):
    """A client error to answer with vLLM's error body."""

    def __init__(self, status: int, message: str, err_type: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.err_type = err_type
        self.param = param

    def response(self) -> web.Response:
        return error_response(self.status, self.message, self.err_type, self.param)


_NO_VALUE = object()


def _bad(message: str, parameter: str | None = None, value: Any = _NO_VALUE) -> ApiError:
    """One of vLLM's own checks failed: ``(parameter=..., value=...)`` ends the message when there is one."""
    if parameter is not None:
        detail = f"parameter={parameter}" if value is _NO_VALUE else f"parameter={parameter}, value={value}"
        message = f"{message} ({detail})"
    return ApiError(400, message, "BadRequestError", parameter)


# --- request validation: pydantic's errors, as vLLM's handler reports them ---

_MAX_REPORTED_ERRORS = 10
_MAX_ERROR_INPUT_CHARS = 200


def _summary(value: Any) -> str:
    """vLLM's stand-in for an error's ``input``: containers described, everything else as text."""
    if isinstance(value, list | dict):
        return f"<{type(value).__name__} of {len(value)} items>"
    text = value if isinstance(value, str) else str(value)
    if len(text) > _MAX_ERROR_INPUT_CHARS:
        return text[:_MAX_ERROR_INPUT_CHARS] + "...[truncated]"
    return text


class _Errors:
    """Validation errors collected over the whole body (pydantic reports them all, in field order)."""

    __slots__ = ("items",)

    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []

    def add(self, kind: str, loc: str, msg: str, value: Any, ctx: dict[str, Any] | None = None) -> None:
        error: dict[str, Any] = {"type": kind, "loc": loc, "msg": msg, "input": _summary(value)}
        if ctx is not None:
            error["ctx"] = ctx
        self.items.append(error)

    def check(self) -> None:
        if self.items:
            raise validation_error(self.items)


def validation_error(errors: list[Any]) -> ApiError:
    """vLLM's answer to a ``RequestValidationError``: ``type`` "Bad Request", ``param`` the first location."""
    count = len(errors)
    label = "error" if count == 1 else "errors"
    lines = [f"{count} validation {label}:"]
    lines += [f"  {error}" for error in errors[:_MAX_REPORTED_ERRORS]]
    if count > _MAX_REPORTED_ERRORS:
        lines.append(f"  ...and {count - _MAX_REPORTED_ERRORS} more {label}")
    first = errors[0]
    param = first["loc"] if isinstance(first, dict) else None
    return ApiError(400, "\n".join(lines), VALIDATION_ERROR_TYPE, param)


def check_media_type(content_type: str) -> None:
    """vLLM takes JSON bodies only (``application/json``, parameters such as ``charset`` allowed)."""
    if content_type != _JSON:
        raise validation_error(["Unsupported Media Type: Only 'application/json' is allowed"])


def parse_json(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object, or vLLM's 400."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        # The standard library names the problem (and its position) the way vLLM's error does.
        try:
            json.loads(raw)
            position, reason = 0, "JSON decode error"
        except json.JSONDecodeError as exc:
            position, reason = exc.pos, exc.msg
        except (UnicodeDecodeError, ValueError) as exc:
            position, reason = 0, str(exc)
        errors = _Errors()
        errors.add("json_invalid", f"body.{position}", "JSON decode error", {}, {"error": reason})
        raise validation_error(errors.items) from None
    if not isinstance(body, dict):
        errors = _Errors()
        errors.add(
            "model_attributes_type", "body", "Input should be a valid dictionary or object to extract fields from", body
        )
        raise validation_error(errors.items)
    return body


# --- lax-mode field readers: each returns the (coerced) value, or records an error and returns the default ---

_INT_PARSING = "Input should be a valid integer, unable to parse string as an integer"
_TRUE = frozenset({"1", "on", "t", "true", "y", "yes"})
_FALSE = frozenset({"0", "off", "f", "false", "n", "no"})


def _lax_int(errors: _Errors, value: Any, loc: str) -> int | None:
    """pydantic's lax integer: ints, bools, integral floats and integer strings."""
    if isinstance(value, int):  # bool included: lax mode takes true as 1
        return int(value)
    if isinstance(value, float):
        if value.is_integer():
            return int(value)
        errors.add("int_from_float", loc, "Input should be a valid integer, got a number with a fractional part", value)
        return None
    if isinstance(value, str):
        text = value.strip()
        head, dot, zeros = text.partition(".")
        if dot and zeros.strip("0") == "":
            text = head
        try:
            return int(text)
        except ValueError:
            errors.add("int_parsing", loc, _INT_PARSING, value)
            return None
    errors.add("int_type", loc, "Input should be a valid integer", value)
    return None


def _int(
    errors: _Errors,
    body: dict[str, Any],
    key: str,
    default: int | None = None,
    *,
    nullable: bool = True,
    ge: int | None = None,
    le: int | None = None,
    prefix: str = "body",
) -> int | None:
    if key not in body:
        return default
    value = body[key]
    loc = f"{prefix}.{key}"
    if value is None:
        if not nullable:
            errors.add("int_type", loc, "Input should be a valid integer", value)
        return None
    number = value if type(value) is int else _lax_int(errors, value, loc)
    if number is None:
        return default
    if ge is not None and number < ge:
        errors.add("greater_than_equal", loc, f"Input should be greater than or equal to {ge}", value, {"ge": ge})
        return default
    if le is not None and number > le:
        errors.add("less_than_equal", loc, f"Input should be less than or equal to {le}", value, {"le": le})
        return default
    return number


def _bool(errors: _Errors, body: dict[str, Any], key: str, default: bool, *, prefix: str = "body") -> bool:
    value = body.get(key, default)
    if value is None or value is True or value is False:
        return bool(value)
    loc = f"{prefix}.{key}"
    if isinstance(value, int | float):
        if value in (0, 1):
            return bool(value)
        errors.add("bool_parsing", loc, "Input should be a valid boolean, unable to interpret input", value)
        return default
    if isinstance(value, str):
        lowered = value.strip().lower()
        if lowered in _TRUE or lowered in _FALSE:
            return lowered in _TRUE
        errors.add("bool_parsing", loc, "Input should be a valid boolean, unable to interpret input", value)
        return default
    errors.add("bool_type", loc, "Input should be a valid boolean", value)
    return default


def _str(errors: _Errors, body: dict[str, Any], key: str) -> str | None:
    value = body.get(key)
    if value is None or isinstance(value, str):
        return value
    errors.add("string_type", f"body.{key}", "Input should be a valid string", value)
    return None


def _stream_flags(errors: _Errors, body: dict[str, Any]) -> tuple[bool, bool, bool]:
    """(stream, include_usage, continuous usage); ``stream_options`` defaults both to false (vLLM 0.32)."""
    stream = _bool(errors, body, "stream", False)
    options = body.get("stream_options")
    if options is None:
        return stream, False, False
    if not isinstance(options, dict):
        errors.add(
            "model_attributes_type",
            "body.stream_options",
            "Input should be a valid dictionary or object to extract fields from",
            options,
        )
        return stream, False, False
    include_usage = _bool(errors, options, "include_usage", False, prefix="body.stream_options")
    continuous = _bool(errors, options, "continuous_usage_stats", False, prefix="body.stream_options")
    # Continuous usage is only reported together with the final usage.
    return stream, include_usage, include_usage and continuous


def _check_stream_options(body: dict[str, Any], stream: bool) -> None:
    if body.get("stream_options") and not stream:
        raise _bad("Stream options can only be defined when `stream=True`.", "stream_options")


def _resolve_model(model: str | None, config: MockConfig) -> str:
    """The served model a request names; no ``model`` means the first one (vLLM's behaviour)."""
    if model is None:
        return config.models[0]
    if model not in config.models:
        raise ApiError(
            404,
            f"The model `{model}` does not exist. Valid aliases: {', '.join(config.models)}.",
            "NotFoundError",
            "model",
        )
    return model


def _check_max_tokens(config: MockConfig, requested: int | None, name: str) -> None:
    limit = config.max_model_len
    if requested is not None and requested > limit:
        raise _bad(
            f"{name}={requested} cannot be greater than max_model_len={limit}. Please request fewer output tokens.",
            name,
            requested,
        )


def _check_prompt_len(config: MockConfig, length: int, *, text: bool) -> None:
    """A prompt longer than the context fails; vLLM tokenizes a text only up to one token past the limit."""
    limit = config.max_model_len
    if length <= limit:
        return
    shown = limit + 1 if text else length
    contains = f"at least {shown}" if text else str(shown)
    raise _bad(
        f"This model's maximum context length is {limit} tokens. However, your prompt contains {contains} input "
        "tokens, which exceeds this limit even without any output tokens. Please reduce the length of the input "
        "prompt.",
        "input_tokens",
        shown,
    )


def _check_n(n: int) -> None:
    if n < 1:
        raise _bad(f"n must be at least 1, got {n}.")


def _max_tokens_left(config: MockConfig, requested: int | None, prompt_len: int) -> int:
    """What a sequence may generate: the request's limit, within what the prompt leaves of the context."""
    left = config.max_model_len - prompt_len
    effective = left if requested is None else min(requested, left)
    if effective < 1:
        raise _bad(f"max_tokens must be at least 1, got {effective}.", "max_tokens", effective)
    return effective


@dataclass(slots=True)
class GenerationRequest:
    """A chat or completions request, reduced to what the mock needs to answer it."""

    model: str
    #: Token strings (or ids) of the whole prompt: ``len()`` is ``usage.prompt_tokens``.
    tokens: list[Any]
    #: One text per prompt of the batch (chat: one); seeds the replies.
    prompt_texts: list[str]
    #: Token count of each prompt of the batch.
    prompt_lens: list[int]
    #: The most tokens each prompt's sequences may generate (the request's limit within the context).
    max_tokens: list[int]
    n: int
    seed: int | None
    stream: bool
    include_usage: bool
    continuous_usage: bool


# --- chat ---

_MESSAGE_VARIANT = "ChatCompletionDeveloperMessageParam"  # the first member of vLLM's message union


def _message_ok(message: Any) -> bool:
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        return False
    content = message.get("content")
    name = message.get("name")
    return (content is None or isinstance(content, str | list)) and (name is None or isinstance(name, str))


def _message_errors(errors: _Errors, message: Any, loc: str) -> None:
    """A message no member of vLLM's union accepts. pydantic reports every member's errors; the mock reports
    the first member's (``param`` is the same: the first error's location)."""
    loc = f"{loc}.{_MESSAGE_VARIANT}"
    if not isinstance(message, dict):
        errors.add("dict_type", loc, "Input should be a valid dictionary", message)
        return
    if "content" not in message:
        errors.add("missing", f"{loc}.content", "Field required", message)
    elif not isinstance(message["content"], str | list):
        errors.add("string_type", f"{loc}.content", "Input should be a valid string", message["content"])
    if "role" not in message:
        errors.add("missing", f"{loc}.role", "Field required", message)
    elif message["role"] != "developer":
        errors.add(
            "literal_error",
            f"{loc}.role",
            "Input should be 'developer'",
            message["role"],
            {"expected": "'developer'"},
        )
    name = message.get("name")
    if name is not None and not isinstance(name, str):
        errors.add("string_type", f"{loc}.name", "Input should be a valid string", name)


def _messages(errors: _Errors, body: dict[str, Any]) -> list[Any]:
    if "messages" not in body:
        errors.add("missing", "body.messages", "Field required", body)
        return []
    messages = body["messages"]
    if not isinstance(messages, list):
        errors.add("list_type", "body.messages", "Input should be a valid list", messages)
        return []
    for index, message in enumerate(messages):
        if not _message_ok(message):
            _message_errors(errors, message, f"body.messages.{index}")
    return messages


def parse_chat(body: dict[str, Any], config: MockConfig) -> GenerationRequest:
    errors = _Errors()
    messages = _messages(errors, body)
    model = _str(errors, body, "model")
    max_tokens = _int(errors, body, "max_tokens")
    max_completion = _int(errors, body, "max_completion_tokens")
    n = _int(errors, body, "n", 1)
    seed = _int(errors, body, "seed", ge=_INT64_MIN, le=_INT64_MAX)
    stream, include_usage, continuous = _stream_flags(errors, body)
    errors.check()
    _check_stream_options(body, stream)
    served = _resolve_model(model, config)
    # max_completion_tokens wins over max_tokens, and names itself in the error.
    if max_completion is not None:
        requested, name = max_completion, "max_completion_tokens"
    else:
        requested, name = max_tokens, "max_tokens"
    _check_max_tokens(config, requested, name)
    if not messages:
        raise _bad("Cannot apply chat template to an empty conversation. Provide at least one message.")
    tokens = chat_prompt_tokens(messages)
    _check_prompt_len(config, len(tokens), text=True)
    n = 1 if n is None else n
    _check_n(n)
    limit = _max_tokens_left(config, requested, len(tokens))
    return GenerationRequest(
        served,
        tokens,
        [chat_prompt_text(messages)],
        [len(tokens)],
        [limit],
        n,
        seed,
        stream,
        include_usage,
        continuous,
    )


# --- completions ---


def _is_int_list(value: Any) -> bool:
    return isinstance(value, list) and all(type(x) is int for x in value)


def _prompt_batch(errors: _Errors, value: Any, loc: str) -> list[str | list[int]]:
    """``str | list[str] | list[int] | list[list[int]]`` as a batch of prompts (a list of ints is one prompt).

    A list that is none of these is tried as a list of (lax) ints, the union's first member, whose errors
    pydantic reports first."""
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list):
        errors.add("list_type", loc, "Input should be a valid list", value)
        return []
    if not value:
        return []
    if _is_int_list(value):
        return [value]
    if all(isinstance(x, str) for x in value) or all(_is_int_list(x) for x in value):
        return value
    coerced = []
    for index, item in enumerate(value):
        number = _lax_int(errors, item, f"{loc}.{index}") if not isinstance(item, list) else None
        if number is None:
            if isinstance(item, list):
                errors.add("int_type", f"{loc}.{index}", "Input should be a valid integer", item)
            return []
        coerced.append(number)
    return [coerced]


def _key(item: str | list[int]) -> str:
    return item if isinstance(item, str) else " ".join(map(str, item))


def parse_completion(body: dict[str, Any], config: MockConfig) -> GenerationRequest:
    errors = _Errors()
    model = _str(errors, body, "model")
    prompt = body.get("prompt")
    batch = _prompt_batch(errors, prompt, "body.prompt") if prompt is not None else []
    max_tokens = _int(errors, body, "max_tokens", COMPLETIONS_DEFAULT_MAX_TOKENS)
    n = _int(errors, body, "n", 1, nullable=False)
    seed = _int(errors, body, "seed", ge=_INT64_MIN, le=_INT64_MAX)
    stream, include_usage, continuous = _stream_flags(errors, body)
    errors.check()
    if prompt is None or prompt == "":
        raise _bad("Either prompt or prompt_embeds must be provided and non-empty.", "prompt")
    _check_stream_options(body, stream)
    served = _resolve_model(model, config)
    _check_max_tokens(config, max_tokens, "max_tokens")
    if not batch:
        raise _bad("You must pass at least one prompt")
    lens = []
    for item in batch:
        if not item and isinstance(item, list):
            raise _bad("The decoder prompt cannot be empty")
        length = count_prompt(item)
        _check_prompt_len(config, length, text=isinstance(item, str))
        lens.append(length)
    n = 1 if n is None else n
    _check_n(n)
    limits = [_max_tokens_left(config, max_tokens, length) for length in lens]
    return GenerationRequest(
        served,
        prompt_tokens(batch),
        [_key(item) for item in batch],
        lens,
        limits,
        n,
        seed,
        stream,
        include_usage,
        continuous,
    )


# --- embeddings and tokenize (not compared with a real server: vLLM's field names, the mock's own checks) ---


@dataclass(slots=True)
class EmbeddingRequest:
    model: str
    keys: list[str]
    prompt_tokens: int
    as_base64: bool
    dimensions: int | None


def parse_embedding(body: dict[str, Any], config: MockConfig) -> EmbeddingRequest:
    errors = _Errors()
    model = _str(errors, body, "model")
    if body.get("input") is None:
        errors.add("missing", "body.input", "Field required", body)
        batch: list[str | list[int]] = []
    else:
        batch = _prompt_batch(errors, body["input"], "body.input")
    fmt = body.get("encoding_format")
    if fmt not in (None, "float", "base64"):
        errors.add(
            "literal_error", "body.encoding_format", "Input should be 'float' or 'base64'", fmt,
            {"expected": "'float' or 'base64'"},
        )  # fmt: skip
    dimensions = _int(errors, body, "dimensions")
    errors.check()
    served = _resolve_model(model, config)
    if not batch:
        raise _bad("You must pass at least one input")
    for item in batch:
        length = count_prompt(item)
        if length > config.max_model_len:
            raise _bad(
                f"This model's maximum context length is {config.max_model_len} tokens. However, you "
                f"requested {length} tokens in the input for embedding generation. Please reduce the "
                "length of the input.",
                "input_tokens",
                length,
            )
    if dimensions is not None and not 1 <= dimensions <= config.embedding_dim:
        message = f"dimensions must be between 1 and {config.embedding_dim}, got {dimensions}."
        raise _bad(message, "dimensions", dimensions)
    return EmbeddingRequest(served, [_key(item) for item in batch], count_prompt(batch), fmt == "base64", dimensions)


def parse_tokenize(body: dict[str, Any], config: MockConfig) -> tuple[str, list[Any], bool]:
    """``/tokenize``: (model, tokens, return_token_strs) for a ``prompt`` or a chat ``messages`` body."""
    errors = _Errors()
    model = _str(errors, body, "model")
    return_strs = _bool(errors, body, "return_token_strs", False)
    messages = _messages(errors, body) if body.get("messages") is not None else None
    batch = _prompt_batch(errors, body["prompt"], "body.prompt") if body.get("prompt") is not None else None
    if messages is None and batch is None:
        errors.add("missing", "body.prompt", "Field required", body)
    errors.check()
    served = _resolve_model(model, config)
    if messages is not None:
        return served, chat_prompt_tokens(messages), return_strs
    return served, prompt_tokens(batch), return_strs
