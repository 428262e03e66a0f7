"""Request parsing and errors, in vLLM's OpenAI-server shape.

Only the fields the mock reads are validated (and only when they are set); unknown
fields (``logprobs``, ``tools``, ``stop``, ...) are accepted and ignored, as a real
server would accept them.
"""

from __future__ import annotations

from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import orjson
from aiohttp import web

from .config import MockConfig
from .tokenizer import chat_prompt_text, chat_prompt_tokens, count_prompt, prompt_tokens

__all__ = [
    "ApiError",
    "EmbeddingRequest",
    "GenerationRequest",
    "error_body",
    "error_response",
    "parse_chat",
    "parse_completion",
    "parse_embedding",
    "parse_json",
    "parse_tokenize",
]

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

_JSON = "application/json"
#: vLLM's default ``max_tokens`` for the legacy completions API (OpenAI's default too).
COMPLETIONS_DEFAULT_MAX_TOKENS = 16


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


def _bad(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, "BadRequestError", param)


def parse_json(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object, or a 400."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise _bad(f"JSON decode error: {exc}") from None
    if not isinstance(body, dict):
        raise _bad("The request body must be a JSON object.")
    return body


# --- typed field readers: a field that is absent or null is "not set" and never fails ---


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _opt_int(body: dict[str, Any], key: str, minimum: int | None = None) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if not _is_int(value):
        raise _bad(f"`{key}` must be an integer, got {_kind(value)}.", key)
    if minimum is not None and value < minimum:
        raise _bad(f"`{key}` must be at least {minimum}, got {value}.", key)
    return int(value)


def _opt_bool(body: dict[str, Any], key: str, default: bool) -> bool:
    value = body.get(key, default)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise _bad(f"`{key}` must be a boolean, got {_kind(value)}.", key)
    return value


def _kind(value: Any) -> str:
    return type(value).__name__


def resolve_model(body: dict[str, Any], config: MockConfig) -> str:
    """The served model a request names; no ``model`` means the first one (vLLM's behaviour)."""
    model = body.get("model")
    if model is None:
        return config.models[0]
    if not isinstance(model, str):
        raise _bad(f"`model` must be a string, got {_kind(model)}.", "model")
    if model not in config.models:
        raise ApiError(404, f"The model `{model}` does not exist.", "NotFoundError", "model")
    return model


@dataclass(slots=True)
class GenerationRequest:
    """A chat or completions request, reduced to what the mock needs to answer it."""

    model: str
    #: Token strings (or ids) of the whole prompt: ``len()`` is ``usage.prompt_tokens``.
    tokens: list[Any]
    #: One text per prompt of the batch (chat: one); seeds the replies.
    prompt_texts: list[str]
    #: Token count of each prompt of the batch (bounds the default ``max_tokens``).
    prompt_lens: list[int]
    n: int
    max_tokens: int | None
    seed: int | None
    stream: bool
    include_usage: bool
    continuous_usage: bool


def _stream_flags(body: dict[str, Any]) -> tuple[bool, bool, bool]:
    stream = _opt_bool(body, "stream", False)
    options = body.get("stream_options")
    if options is None:
        return stream, False, False
    if not isinstance(options, dict):
        raise _bad("`stream_options` must be an object.", "stream_options")
    if options and not stream:
        raise _bad("Stream options can only be defined when `stream=True`.", "stream_options")
    # vLLM's StreamOptions defaults include_usage to True once stream_options is given,
    # and continuous usage is only reported together with the final usage.
    include_usage = _opt_bool(options, "include_usage", True)
    continuous = include_usage and _opt_bool(options, "continuous_usage_stats", False)
    return stream, include_usage, continuous


def _check_context(config: MockConfig, prompt_len: int, max_tokens: int | None, what: str) -> None:
    limit = config.max_model_len
    if max_tokens is None:
        if prompt_len >= limit:
            raise _bad(
                f"This model's maximum context length is {limit} tokens. However, your request has "
                f"{prompt_len} input tokens. Please reduce the length of the input {what}."
            )
    elif prompt_len + max_tokens > limit:
        raise _bad(
            f"This model's maximum context length is {limit} tokens. However, you requested "
            f"{prompt_len + max_tokens} tokens ({prompt_len} in the {what}, {max_tokens} in the "
            f"completion). Please reduce the length of the {what} or completion."
        )


def _validate_messages(messages: Any) -> list[Any]:
    if messages is None:
        raise _bad("`messages` is required.", "messages")
    if not isinstance(messages, list):
        raise _bad(f"`messages` must be a list, got {_kind(messages)}.", "messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise _bad(f"`messages[{i}]` must be an object.", "messages")
        if not isinstance(message.get("role"), str):
            raise _bad(f"`messages[{i}].role` must be a string.", "messages")
        content = message.get("content")
        if content is not None and not isinstance(content, str | list):
            raise _bad(f"`messages[{i}].content` must be a string or a list of parts.", "messages")
        name = message.get("name")
        if name is not None and not isinstance(name, str):
            raise _bad(f"`messages[{i}].name` must be a string.", "messages")
    return messages


def parse_chat(body: dict[str, Any], config: MockConfig) -> GenerationRequest:
    model = resolve_model(body, config)
    messages = _validate_messages(body.get("messages"))
    n = _opt_int(body, "n", 1) or 1
    max_completion = _opt_int(body, "max_completion_tokens", 1)
    max_tokens = _opt_int(body, "max_tokens", 1)
    if max_completion is not None:
        max_tokens = max_completion
    seed = _opt_int(body, "seed")
    stream, include_usage, continuous = _stream_flags(body)
    tokens = chat_prompt_tokens(messages)
    _check_context(config, len(tokens), max_tokens, "messages")
    return GenerationRequest(
        model,
        tokens,
        [chat_prompt_text(messages)],
        [len(tokens)],
        n,
        max_tokens,
        seed,
        stream,
        include_usage,
        continuous,
    )


def _is_int_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(_is_int(x) for x in value)


def _batch(value: Any, param: str) -> list[str | list[int]]:
    """A prompt/input as a batch: a string, a list of ints (one tokenized prompt), or a list of either."""
    if isinstance(value, str) or _is_int_list(value):
        return [value]
    if isinstance(value, list) and value and all(isinstance(x, str) or _is_int_list(x) for x in value):
        return value
    if isinstance(value, list) and not value:
        raise _bad(f"`{param}` cannot be empty.", param)
    raise _bad(
        f"`{param}` must be a string, a list of strings, a list of token ids or a list of token id lists.",
        param,
    )


def _key(item: str | list[int]) -> str:
    return item if isinstance(item, str) else " ".join(map(str, item))


def parse_completion(body: dict[str, Any], config: MockConfig) -> GenerationRequest:
    model = resolve_model(body, config)
    if "prompt" not in body or body["prompt"] is None:
        raise _bad("`prompt` is required.", "prompt")
    batch = _batch(body["prompt"], "prompt")
    n = _opt_int(body, "n", 1) or 1
    max_tokens = _opt_int(body, "max_tokens", 1) if "max_tokens" in body else COMPLETIONS_DEFAULT_MAX_TOKENS
    seed = _opt_int(body, "seed")
    stream, include_usage, continuous = _stream_flags(body)
    lens = [count_prompt(item) for item in batch]
    for length in lens:
        _check_context(config, length, max_tokens, "prompt")
    return GenerationRequest(
        model,
        prompt_tokens(batch),
        [_key(item) for item in batch],
        lens,
        n,
        max_tokens,
        seed,
        stream,
        include_usage,
        continuous,
    )


@dataclass(slots=True)
class EmbeddingRequest:
    model: str
    keys: list[str]
    prompt_tokens: int
    as_base64: bool
    dimensions: int | None


def parse_embedding(body: dict[str, Any], config: MockConfig) -> EmbeddingRequest:
    model = resolve_model(body, config)
    if "input" not in body or body["input"] is None:
        raise _bad("`input` is required.", "input")
    batch = _batch(body["input"], "input")
    for item in batch:
        length = count_prompt(item)
        if length > config.max_model_len:
            raise _bad(
                f"This model's maximum context length is {config.max_model_len} tokens. However, you "
                f"requested {length} tokens in the input for embedding generation. Please reduce the "
                "length of the input."
            )
    fmt = body.get("encoding_format")
    if fmt not in (None, "float", "base64"):
        raise _bad("`encoding_format` must be 'float' or 'base64'.", "encoding_format")
    dimensions = _opt_int(body, "dimensions", 1)
    if dimensions is not None and dimensions > config.embedding_dim:
        raise _bad(f"`dimensions` must be at most the model's embedding size {config.embedding_dim}.", "dimensions")
    return EmbeddingRequest(model, [_key(item) for item in batch], count_prompt(batch), fmt == "base64", dimensions)


def parse_tokenize(body: dict[str, Any], config: MockConfig) -> tuple[str, list[Any], bool]:
    """``/tokenize``: (model, tokens, return_token_strs) for a ``prompt`` or a chat ``messages`` body."""
    model = resolve_model(body, config)
    return_strs = _opt_bool(body, "return_token_strs", False)
    if body.get("messages") is not None:
        return model, chat_prompt_tokens(_validate_messages(body["messages"])), return_strs
    if body.get("prompt") is None:
        raise _bad("`prompt` or `messages` is required.", "prompt")
    return model, prompt_tokens(_batch(body["prompt"], "prompt")), return_strs
