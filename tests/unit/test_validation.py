"""gateway.validation.parse_call: the few fields the gateway acts on, with OpenAI-style errors naming the param."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from gateway.errors import InvalidRequest
from gateway.validation import CHAT, COMPLETIONS, EMBEDDINGS, parse_call

BASES: dict[str, dict[str, Any]] = {
    CHAT: {"model": "m", "messages": [{"role": "user", "content": "hi"}]},
    COMPLETIONS: {"model": "m", "prompt": "Once upon"},
    EMBEDDINGS: {"model": "m", "input": ["a", "b"]},
}

_DROP = object()  # a field to leave out of the request


def _call(endpoint: str, **fields: Any) -> Any:
    payload = {**BASES[endpoint], **fields}
    return parse_call(endpoint, orjson.dumps({k: v for k, v in payload.items() if v is not _DROP}))


def _refused(endpoint: str, **fields: Any) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as info:
        _call(endpoint, **fields)
    assert info.value.status == 400
    return info.value


@pytest.mark.parametrize("endpoint", [CHAT, COMPLETIONS, EMBEDDINGS])
def test_minimal_requests(endpoint: str) -> None:
    call = _call(endpoint)
    assert call.model == "m"
    assert call.stream is False
    assert call.include_usage is False
    assert call.max_tokens is None
    assert call.end_user is None
    assert call.payload == BASES[endpoint]


@pytest.mark.parametrize(("endpoint", "required"), [(CHAT, "messages"), (COMPLETIONS, "prompt"), (EMBEDDINGS, "input")])
def test_each_endpoint_requires_its_field(endpoint: str, required: str) -> None:
    error = _refused(endpoint, **{required: _DROP})
    assert (error.param, error.code) == (required, "missing_required_parameter")
    assert f"'{required}'" in error.message
    error = _refused(endpoint, **{required: None})
    assert error.param == required


def test_other_endpoints_fields_do_not_count() -> None:
    error = _refused(CHAT, messages=_DROP, prompt="hi")
    assert error.param == "messages"


@pytest.mark.parametrize(
    ("endpoint", "fields", "param"),
    [
        (CHAT, {"model": 3}, "model"),
        (CHAT, {"model": ""}, "model"),
        (CHAT, {"messages": "hi"}, "messages"),
        (CHAT, {"messages": ["hi"]}, "messages"),
        (COMPLETIONS, {"prompt": 3}, "prompt"),
        (EMBEDDINGS, {"input": {"text": "x"}}, "input"),
        (CHAT, {"stream": "yes"}, "stream"),
        (CHAT, {"stream": 1}, "stream"),
        (CHAT, {"stream_options": True}, "stream_options"),
        (CHAT, {"max_tokens": "10"}, "max_tokens"),
        (CHAT, {"max_tokens": -1}, "max_tokens"),
        (CHAT, {"max_tokens": 1.5}, "max_tokens"),
        (CHAT, {"max_tokens": True}, "max_tokens"),
        (CHAT, {"max_completion_tokens": "10"}, "max_completion_tokens"),
        (CHAT, {"max_completion_tokens": -5, "max_tokens": 10}, "max_completion_tokens"),
        (CHAT, {"user": 42}, "user"),
    ],
)
def test_type_errors_name_the_param(endpoint: str, fields: dict[str, Any], param: str) -> None:
    error = _refused(endpoint, **fields)
    assert error.param == param
    assert error.code == "invalid_type"
    assert f"'{param}'" in error.message


def test_missing_model() -> None:
    error = _refused(CHAT, model=_DROP)
    assert (error.param, error.code) == ("model", "missing_required_parameter")


@pytest.mark.parametrize(
    ("body", "fragment"),
    [(b"", "empty"), (b"{not json", "not valid JSON"), (b"[1,2]", "JSON object"), (b'"s"', "JSON object")],
)
def test_bodies_that_are_not_json_objects(body: bytes, fragment: str) -> None:
    with pytest.raises(InvalidRequest, match=fragment) as info:
        parse_call(CHAT, body)
    assert info.value.code == "invalid_json"


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"max_tokens": 100}, 100),
        ({"max_completion_tokens": 50}, 50),
        ({"max_completion_tokens": 50, "max_tokens": 100}, 50),  # the newer name wins, as upstream
        ({"max_tokens": 0}, 0),
        ({"max_tokens": None}, None),
    ],
)
def test_max_tokens(fields: dict[str, Any], expected: int | None) -> None:
    assert _call(CHAT, **fields).max_tokens == expected


def test_null_max_completion_tokens_falls_back_to_max_tokens() -> None:
    assert _call(CHAT, max_completion_tokens=None, max_tokens=100).max_tokens == 100


def test_stream_and_usage_wish() -> None:
    call = _call(CHAT, stream=True, stream_options={"include_usage": True})
    assert (call.stream, call.include_usage) == (True, True)
    assert _call(CHAT, stream=True, stream_options={"include_usage": "yes"}).include_usage is False
    assert _call(CHAT, stream=True, stream_options={}).include_usage is False
    assert _call(CHAT, stream=None).stream is False
    assert _call(COMPLETIONS, stream=True).stream is True


def test_stream_for_embeddings_refused() -> None:
    error = _refused(EMBEDDINGS, stream=True)
    assert (error.param, error.code) == ("stream", "invalid_value")
    assert _call(EMBEDDINGS, stream=False).stream is False


def test_end_user_truncated_and_empty_is_none() -> None:
    assert _call(CHAT, user="u" * 1000).end_user == "u" * 256
    assert _call(CHAT, user="").end_user is None
    assert _call(CHAT, user="alice").end_user == "alice"


def test_unknown_fields_pass_through_untouched() -> None:
    call = _call(CHAT, temperature=0.2, tools=[{"type": "function"}], extra_body={"x": 1})
    assert call.payload["temperature"] == 0.2
    assert call.payload["tools"] == [{"type": "function"}]
    assert call.payload["extra_body"] == {"x": 1}


def test_prompt_and_input_forms() -> None:
    assert _call(COMPLETIONS, prompt=[1, 2, 3]).payload["prompt"] == [1, 2, 3]
    assert _call(COMPLETIONS, prompt=["a", "b"]).model == "m"
    assert _call(EMBEDDINGS, input="one string").model == "m"
    assert _call(CHAT, messages=[]).payload["messages"] == []
