"""gateway.relay.forward.read_usage: usage and finish reason from a whole (non-streaming) answer body."""

from __future__ import annotations

import orjson
import pytest

from gateway.context import Usage
from gateway.relay.forward import read_usage


def _chat(content: str, *, usage: object, usage_first: bool = False, finish: str = "stop") -> bytes:
    choices = [
        {
            "index": 0,
            "message": {"role": "assistant", "content": content, "tool_calls": []},
            "logprobs": None,
            "finish_reason": finish,
        }
    ]
    head = {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "m"}
    if usage_first:
        return orjson.dumps({**head, "usage": usage, "choices": choices})
    return orjson.dumps({**head, "choices": choices, "usage": usage, "prompt_logprobs": None})


def test_usage_at_the_end() -> None:
    body = _chat("Paris.", usage={"prompt_tokens": 17, "total_tokens": 19, "completion_tokens": 2})
    assert read_usage(body) == (Usage(17, 2, 0, 0, "backend"), "stop")


def test_nested_details() -> None:
    usage = {
        "prompt_tokens": 1200,
        "completion_tokens": 300,
        "total_tokens": 1500,
        "prompt_tokens_details": {"cached_tokens": 1024, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 192, "accepted_prediction_tokens": 0},
    }
    assert read_usage(_chat("x", usage=usage, finish="length")) == (Usage(1200, 300, 1024, 192, "backend"), "length")


def test_usage_before_choices() -> None:
    body = _chat("}{ braces in text }", usage={"prompt_tokens": 5, "completion_tokens": 6}, usage_first=True)
    assert read_usage(body) == (Usage(5, 6, 0, 0, "backend"), "stop")


def test_null_usage_at_the_end() -> None:
    assert read_usage(_chat("hi", usage=None)) == (None, "stop")


def test_null_usage_before_choices() -> None:
    usage, reason = read_usage(_chat("hi", usage=None, usage_first=True))
    assert usage is None
    assert reason == "stop"


def test_usage_words_inside_message_content() -> None:
    fake = '{"usage": {"prompt_tokens": 999, "completion_tokens": 999}} and "finish_reason": "length"'
    body = _chat(fake, usage={"prompt_tokens": 3, "completion_tokens": 4})
    assert b'\\"usage\\"' in body  # the content's quotes are escaped in the body
    assert read_usage(body) == (Usage(3, 4, 0, 0, "backend"), "stop")


def test_usage_words_in_content_and_no_usage() -> None:
    body = _chat('say "usage": {"prompt_tokens": 999}', usage=None)
    assert read_usage(body) == (None, "stop")


def test_huge_embeddings_body() -> None:
    data = [{"object": "embedding", "index": i, "embedding": [0.001 * j for j in range(1024)]} for i in range(128)]
    body = orjson.dumps(
        {"object": "list", "data": data, "model": "e", "usage": {"prompt_tokens": 640, "total_tokens": 640}}
    )
    assert len(body) > 1_000_000
    assert read_usage(body) == (Usage(640, 0, 0, 0, "backend"), None)


def test_embeddings_body_without_usage() -> None:
    body = orjson.dumps({"object": "list", "data": [{"object": "embedding", "index": 0, "embedding": [0.5]}]})
    assert read_usage(body) == (None, None)


@pytest.mark.parametrize(
    "body",
    [b"", b"not json", b"[1, 2, 3]", b'"usage"', b'{"usage": {"prompt_tokens": 1', b"<html>502 Bad Gateway</html>"],
)
def test_malformed_bodies(body: bytes) -> None:
    assert read_usage(body) == (None, None)
