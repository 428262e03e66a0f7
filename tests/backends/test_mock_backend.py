"""The mock vLLM backend: wire format, exact usage, faults, metrics, control plane and CLI.

Servers run in-process (``backends.mock.serve``) on a free port, except the CLI tests,
which start ``python -m backends.mock --port 0`` and read the port from its one line.
Synchronisation waits on the server's state (``state.wait_for``), never on sleeps.
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
import os
import re
import signal
import sys
from array import array
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from backends.mock import MockConfig, RunningMock, serve
from backends.mock.generation import MAX_NATURAL_TOKENS, MIN_NATURAL_TOKENS
from backends.mock.tokenizer import (
    chat_prompt_tokens,
    count_chat_prompt,
    count_embedding_input,
    count_prompt,
    count_text,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hello, world! How's the weather in São Paulo?"},
]
HEX16 = re.compile(r"[0-9a-f]{16}")
FINGERPRINT = re.compile(r"vllm-0\.32\.0-[0-9a-f]{8}")


@pytest.fixture
async def mock() -> AsyncIterator[RunningMock]:
    async with serve(MockConfig()) as running:
        yield running


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def oai(mock: RunningMock) -> AsyncIterator[openai.AsyncOpenAI]:
    client = openai.AsyncOpenAI(base_url=f"{mock.url}/v1", api_key="x", max_retries=0)
    try:
        yield client
    finally:
        await client.close()


async def post(http: aiohttp.ClientSession, mock: RunningMock, path: str, body: Any, **kwargs: Any) -> tuple[int, Any]:
    async with http.post(f"{mock.url}{path}", json=body, **kwargs) as resp:
        return resp.status, await resp.json(content_type=None)


def sse_events(raw: str) -> list[Any]:
    """The events of a complete SSE body: parsed JSON objects, and the string ``[DONE]``."""
    assert raw.endswith("\n\n")
    events: list[Any] = []
    for block in raw[:-2].split("\n\n"):
        assert block.startswith("data: "), block
        data = block[len("data: ") :]
        events.append(data if data == "[DONE]" else json.loads(data))
    return events


async def stream(http: aiohttp.ClientSession, mock: RunningMock, path: str, body: Any) -> list[Any]:
    async with http.post(f"{mock.url}{path}", json={**body, "stream": True}) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        return sse_events(await resp.text())


def chat(**extra: Any) -> dict[str, Any]:
    return {"model": "mock-small", "messages": MESSAGES, **extra}


# --- tokenizer ---


def test_tokenizer_counts() -> None:
    assert count_text("Hello, world!") == 4
    assert count_text("") == 0
    assert count_text("  don't\tstop  ") == 4  # don ' t stop
    # Per message: 3 + role + name + content; plus 3 priming the reply.
    messages = [
        {"role": "system", "content": "Be brief."},  # 3 + 1 + 3
        {"role": "user", "name": "ann", "content": [{"type": "text", "text": "Hi there"}, {"type": "image_url"}]},
        {"role": "assistant", "content": None, "tool_calls": []},  # 3 + 1 + 0
    ]
    assert count_chat_prompt(messages) == 7 + (3 + 1 + 1 + 2) + 4 + 3
    assert count_chat_prompt(messages) == len(chat_prompt_tokens(messages))
    assert count_prompt("a b c") == 3
    assert count_prompt(["a b", "c"]) == 3
    assert count_prompt([5, 6, 7, 8]) == 4
    assert count_prompt([[1, 2], [3]]) == 3
    assert count_embedding_input(["x y", "z"]) == 3


# --- chat ---


async def test_chat_non_stream_shape_and_exact_usage(http: aiohttp.ClientSession, mock: RunningMock) -> None:
    status, body = await post(http, mock, "/v1/chat/completions", chat())
    assert status == 200
    # vLLM 0.32's ChatCompletionResponse, every field, in its order.
    assert list(body) == [
        "id",
        "object",
        "created",
        "model",
        "choices",
        "service_tier",
        "system_fingerprint",
        "usage",
        "prompt_logprobs",
        "prompt_token_ids",
        "prompt_text",
        "kv_transfer_params",
        "ec_transfer_params",
        "metrics",
    ]
    assert body["id"].startswith("chatcmpl-") and HEX16.fullmatch(body["id"][len("chatcmpl-") :])
    assert FINGERPRINT.fullmatch(body["system_fingerprint"])
    assert all(body[key] is None for key in list(body)[8:])
    assert body["object"] == "chat.completion"
    assert isinstance(body["created"], int)
    assert body["model"] == "mock-small"
    (choice,) = body["choices"]
    assert choice == {
        "index": 0,
        "message": {
            "role": "assistant",
            "content": choice["message"]["content"],
            "refusal": None,
            "annotations": None,
            "audio": None,
            "function_call": None,
            "reasoning": None,
        },
        "logprobs": None,
        "finish_reason": "stop",
        "stop_reason": None,
        "token_ids": None,
        "routed_experts": None,
    }
    completion = count_text(choice["message"]["content"])
    assert MIN_NATURAL_TOKENS <= completion <= MAX_NATURAL_TOKENS
    prompt = count_chat_prompt(MESSAGES)
    assert body["usage"] == {
        "prompt_tokens": prompt,
        "total_tokens": prompt + completion,
        "completion_tokens": completion,
        "prompt_tokens_details": None,
        "completion_tokens_details": None,
    }
    # The fingerprint names the server's configuration: the same on every reply, another for other models.
    _, again = await post(http, mock, "/v1/completions", {"prompt": "x"})
    assert again["system_fingerprint"] == body["system_fingerprint"]
    async with serve(MockConfig(models=("other",))) as other:
        _, elsewhere = await post(http, other, "/v1/chat/completions", chat(model="other"))
    assert FINGERPRINT.fullmatch(elsewhere["system_fingerprint"])
    assert elsewhere["system_fingerprint"] != body["system_fingerprint"]


async def test_chat_is_deterministic_and_seeded(http: aiohttp.ClientSession, mock: RunningMock) -> None:
    _, first = await post(http, mock, "/v1/chat/completions", chat())
    _, again = await post(http, mock, "/v1/chat/completions", chat())
    assert first["choices"] == again["choices"]
    contents = set()
    for seed in range(5):
        _, seeded = await post(http, mock, "/v1/chat/completions", chat(seed=seed))
        contents.add(seeded["choices"][0]["message"]["content"])
    assert len(contents) > 1


async def test_response_id_follows_x_request_id(http: aiohttp.ClientSession, mock: RunningMock) -> None:
    # vLLM builds the response id from the X-Request-Id header when there is one.
    _, body = await post(http, mock, "/v1/chat/completions", chat(), headers={"X-Request-Id": "abc-123"})
    assert body["id"] == "chatcmpl-abc-123"


async def test_chat_stream_without_usage(http: aiohttp.ClientSession, mock: RunningMock) -> None:
    _, whole = await post(http, mock, "/v1/chat/completions", chat())
    events = await stream(http, mock, "/v1/chat/completions", chat())
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all("usage" not in chunk for chunk in chunks)
    first = chunks[0]
    assert list(first) == ["id", "object", "created", "model", "choices", "prompt_token_ids", "prompt_text"]
    assert first["object"] == "chat.completion.chunk"
    assert first["choices"] == [
        {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
    ]
    assert first["prompt_token_ids"] is None and first["prompt_text"] is None
    assert len({(c["id"], c["created"], c["model"]) for c in chunks}) == 1
    assert HEX16.fullmatch(first["id"][len("chatcmpl-") :])
    tokens = chunks[1:]
    for chunk in tokens[:-1]:
        assert list(chunk) == ["id", "object", "created", "model", "choices"]
        assert chunk["choices"][0] == {
            "index": 0,
            "delta": {"content": chunk["choices"][0]["delta"]["content"]},
            "logprobs": None,
            "finish_reason": None,
            "token_ids": None,
        }
    # Without a usage chunk to follow, the finishing chunk carries the fingerprint.
    assert list(tokens[-1]) == ["id", "object", "created", "model", "choices", "system_fingerprint"]
    assert tokens[-1]["system_fingerprint"] == whole["system_fingerprint"]
    last = tokens[-1]["choices"][0]
    assert list(last) == ["index", "delta", "logprobs", "finish_reason", "stop_reason", "token_ids"]
    assert last["finish_reason"] == "stop" and last["stop_reason"] is None
    # One chunk per token; every chunk but the first starts with a space.
    pieces = [c["choices"][0]["delta"]["content"] for c in tokens]
    assert not pieces[0].startswith(" ") and all(p.startswith(" ") for p in pieces[1:])
    assert "".join(pieces) == whole["choices"][0]["message"]["content"]
    assert len(pieces) == whole["usage"]["completion_tokens"]


async def test_chat_stream_include_usage(http: aiohttp.ClientSession, mock: RunningMock) -> None:
    events = await stream(
        http, mock, "/v1/chat/completions", chat(max_tokens=5, stream_options={"include_usage": True})
    )
    assert events[-1] == "[DONE]"
    final = events[-2]
    assert list(final) == ["id", "object", "created", "model", "choices", "usage", "system_fingerprint"]
    assert final["choices"] == []
    assert FINGERPRINT.fullmatch(final["system_fingerprint"])
    prompt = count_chat_prompt(MESSAGES)
    # The usage chunk leaves out the null details.
    assert final["usage"] == {"prompt_tokens": prompt, "total_tokens": prompt + 5, "completion_tokens": 5}
    assert all("usage" not in chunk for chunk in events[:-2])
    assert events[-3]["choices"][0]["finish_reason"] == "length"
    # The usage chunk is the last message, so the finishing chunk has no fingerprint.
    assert all("system_fingerprint" not in chunk for chunk in events[:-2])


async def test_chat_stream_continuous_usage(http: aiohttp.ClientSession, mock: RunningMock) -> None:
    options = {"include_usage": True, "continuous_usage_stats": True}
    events = await stream(http, mock, "/v1/chat/completions", chat(stream_options=options))
    chunks = events[:-1]
    prompt = count_chat_prompt(MESSAGES)
    assert [c["usage"]["completion_tokens"] for c in chunks[:-1]] == list(range(len(chunks) - 1))
    assert all(c["usage"]["prompt_tokens"] == prompt for c in chunks)
    # Chat's running usage sets completion_tokens_details (to null); the final usage leaves it out.
    assert all(list(c["usage"])[-1] == "completion_tokens_details" for c in chunks[:-1])
    assert list(chunks[0]) == [
        "id",
        "object",
        "created",
        "model",
        "choices",
        "usage",
        "prompt_token_ids",
        "prompt_text",
    ]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == len(chunks) - 2
    assert list(chunks[-1]["usage"]) == ["prompt_tokens", "total_tokens", "completion_tokens"]
    # The same for legacy completions (no role chunk there), without the details.
    body = {"model": "mock-small", "prompt": "a b c", "stream_options": options}
    chunks = (await stream(http, mock, "/v1/completions", body))[:-1]
    assert [c["usage"]["completion_tokens"] for c in chunks[:-1]] == list(range(1, len(chunks)))
    assert all(c["usage"]["prompt_tokens"] == 3 for c in chunks)
    assert all(list(c["usage"]) == ["prompt_tokens", "total_tokens", "completion_tokens"] for c in chunks)
    # Running usage is per choice: each choice's own prompt and its own tokens so far.
    body = {"model": "mock-small", "prompt": ["a b c", "d"], "n": 2, "max_tokens": 3, "stream_options": options}
    chunks = (await stream(http, mock, "/v1/completions", body))[:-1]
    running = [
        (c["choices"][0]["index"], c["usage"]["prompt_tokens"], c["usage"]["completion_tokens"]) for c in chunks[:-1]
    ]
    assert sorted(running) == [(i, 3 if i < 2 else 1, k) for i in range(4) for k in (1, 2, 3)]
    assert chunks[-1]["usage"] == {"prompt_tokens": 4, "total_tokens": 16, "completion_tokens": 12}


async def test_stream_options(http: aiohttp.ClientSession, mock: RunningMock) -> None:
    status, body = await post(http, mock, "/v1/chat/completions", chat(stream_options={"include_usage": True}))
    assert (status, body["error"]["type"], body["error"]["param"]) == (400, "BadRequestError", "stream_options")
    assert body["error"]["message"] == (
        "Stream options can only be defined when `stream=True`. (parameter=stream_options)"
    )
    # Empty options are no options at all: fine without streaming, and no usage chunk with it (vLLM 0.32).
    status, _ = await post(http, mock, "/v1/chat/completions", chat(stream_options={}))
    assert status == 200
    events = await stream(http, mock, "/v1/chat/completions", chat(stream_options={}))
    assert all("usage" not in chunk for chunk in events[:-1])
    # Continuous usage needs include_usage.
    events = await stream(http, mock, "/v1/chat/completions", chat(stream_options={"continuous_usage_stats": True}))
    assert all("usage" not in chunk for chunk in events[:-1])


async def test_max_tokens_and_n(http: aiohttp.ClientSession, mock: RunningMock) -> None:
    _, body = await post(http, mock, "/v1/chat/completions", chat(max_tokens=3, n=3))
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert all(c["finish_reason"] == "length" for c in body["choices"])
    assert all(count_text(c["message"]["content"]) == 3 for c in body["choices"])
    assert body["usage"]["completion_tokens"] == 9
    # max_completion_tokens wins over max_tokens, as in vLLM.
    _, body = await post(http, mock, "/v1/chat/completions", chat(max_tokens=3, max_completion_tokens=2))
    assert body["usage"]["completion_tokens"] == 2
    # n > 1 gives different replies and their usage is the sum.
    _, body = await post(http, mock, "/v1/chat/completions", chat(n=4))
    texts = [c["message"]["content"] for c in body["choices"]]
    assert len(set(texts)) > 1
    assert body["usage"]["completion_tokens"] == sum(count_text(t) for t in texts)


async def test_stream_with_n(http: aiohttp.ClientSession, mock: RunningMock) -> None:
    _, whole = await post(http, mock, "/v1/chat/completions", chat(n=2))
    events = await stream(http, mock, "/v1/chat/completions", chat(n=2, stream_options={"include_usage": True}))
    texts: dict[int, str] = {0: "", 1: ""}
    finishes = {}
    for chunk in events[:-2]:
        (choice,) = chunk["choices"]
        texts[choice["index"]] += choice["delta"]["content"]
        if choice["finish_reason"]:
            finishes[choice["index"]] = choice["finish_reason"]
    assert texts == {c["index"]: c["message"]["content"] for c in whole["choices"]}
    assert finishes == {0: "stop", 1: "stop"}
    assert events[-2]["usage"] == {k: v for k, v in whole["usage"].items() if v is not None}


# --- completions ---


async def test_completions(http: aiohttp.ClientSession, mock: RunningMock) -> None:
    body = {"model": "mock-large", "prompt": "Once upon a time,", "max_tokens": 50}
    status, whole = await post(http, mock, "/v1/completions", body)
    assert status == 200
    assert whole["object"] == "text_completion"
    assert whole["id"].startswith("cmpl-") and HEX16.fullmatch(whole["id"][len("cmpl-") :])
    assert list(whole) == [
        "id",
        "object",
        "created",
        "model",
        "choices",
        "service_tier",
        "system_fingerprint",
        "usage",
        "kv_transfer_params",
        "ec_transfer_params",
        "metrics",
    ]
    assert FINGERPRINT.fullmatch(whole["system_fingerprint"])
    (choice,) = whole["choices"]
    assert list(choice) == [
        "index",
        "text",
        "logprobs",
        "finish_reason",
        "stop_reason",
        "token_ids",
        "prompt_logprobs",
        "prompt_token_ids",
        "routed_experts",
    ]
    assert choice["finish_reason"] == "stop"
    completion = count_text(choice["text"])
    assert whole["usage"] == {
        "prompt_tokens": 5,
        "total_tokens": 5 + completion,
        "completion_tokens": completion,
        "prompt_tokens_details": None,
        "completion_tokens_details": None,
    }
    events = await stream(http, mock, "/v1/completions", body)
    assert events[-1] == "[DONE]"
    assert all(c["object"] == "text_completion" and "usage" not in c for c in events[:-1])
    choices = [c["choices"][0] for c in events[:-1]]
    keys = ["index", "text", "logprobs", "finish_reason", "stop_reason", "prompt_token_ids", "token_ids"]
    assert all(list(c) == keys for c in choices)
    assert "".join(c["text"] for c in choices) == choice["text"]
    assert [c["finish_reason"] for c in choices] == [None] * (len(choices) - 1) + ["stop"]
    assert [list(c) for c in events[-3:-1]] == [
        ["id", "object", "created", "model", "choices"],
        ["id", "object", "created", "model", "choices", "system_fingerprint"],
    ]
    events = await stream(http, mock, "/v1/completions", {**body, "stream_options": {"include_usage": True}})
    assert events[-2]["choices"] == []
    assert events[-2]["usage"] == {k: v for k, v in whole["usage"].items() if v is not None}
    assert events[-2]["system_fingerprint"] == whole["system_fingerprint"]
    assert "system_fingerprint" not in events[-3]


async def test_completions_prompt_forms(http: aiohttp.ClientSession, mock: RunningMock) -> None:
    # Without max_tokens the legacy completions API stops at 16 tokens (vLLM's and OpenAI's default).
    _, body = await post(http, mock, "/v1/completions", {"model": "mock-small", "prompt": "x", "seed": 3})
    assert body["usage"]["completion_tokens"] <= 16
    _, body = await post(http, mock, "/v1/completions", {"model": "mock-small", "prompt": [1, 2, 3, 4]})
    assert body["usage"]["prompt_tokens"] == 4
    # A list of prompts is a batch: n choices per prompt, usage summed.
    _, body = await post(http, mock, "/v1/completions", {"model": "mock-small", "prompt": ["a b", "c"], "n": 2})
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert body["usage"]["prompt_tokens"] == 3
    assert body["usage"]["completion_tokens"] == sum(count_text(c["text"]) for c in body["choices"])
    _, body = await post(http, mock, "/v1/completions", {"prompt": [[1, 2], [3]], "max_tokens": 2})
    assert body["usage"] == {**body["usage"], "prompt_tokens": 3, "completion_tokens": 4}
    # Lax integers, as pydantic reads them: a list of numeric strings is a tokenized prompt.
    _, body = await post(http, mock, "/v1/completions", {"prompt": ["5", 6, 7.0]})
    assert body["usage"]["prompt_tokens"] == 3
    # A batch mixing texts and token lists is none of the accepted forms.
    status, error = await post(http, mock, "/v1/completions", {"prompt": ["a b", [1, 2]]})
    assert (status, error["error"]["type"], error["error"]["param"]) == (400, "Bad Request", "body.prompt.0")


# --- embeddings ---


async def test_embeddings(http: aiohttp.ClientSession, mock: RunningMock) -> None:
    body = {"model": "mock-embed", "input": ["Hello, world!", "second input"]}
    status, floats = await post(http, mock, "/v1/embeddings", body)
    assert status == 200
    assert floats["object"] == "list" and floats["id"].startswith("embd-")
    assert floats["usage"] == {
        "prompt_tokens": 6,
        "total_tokens": 6,
        "completion_tokens": 0,
        "prompt_tokens_details": None,
        "completion_tokens_details": None,
    }
    assert [d["index"] for d in floats["data"]] == [0, 1]
    for item in floats["data"]:
        assert item["object"] == "embedding" and len(item["embedding"]) == 16
        assert math.isclose(math.fsum(v * v for v in item["embedding"]), 1.0, rel_tol=1e-5)
    assert floats["data"][0]["embedding"] != floats["data"][1]["embedding"]
    _, encoded = await post(http, mock, "/v1/embeddings", {**body, "encoding_format": "base64"})
    for item, plain in zip(encoded["data"], floats["data"], strict=True):
        decoded = array("f", base64.b64decode(item["embedding"]))
        if sys.byteorder != "little":
            decoded.byteswap()
        assert decoded.tolist() == plain["embedding"]
    _, single = await post(http, mock, "/v1/embeddings", {"model": "mock-embed", "input": "Hello, world!"})
    assert single["data"][0]["embedding"] == floats["data"][0]["embedding"]
    _, short = await post(http, mock, "/v1/embeddings", {**body, "dimensions": 4})
    assert len(short["data"][0]["embedding"]) == 4


# --- tokenize ---


@pytest.mark.parametrize(
    "request_body",
    [
        {"messages": MESSAGES},
        {"messages": [{"role": "user", "name": "bob", "content": [{"type": "text", "text": "a, b"}]}]},
        {"prompt": "The quick brown fox; jumps."},
        {"prompt": [7, 8, 9]},
    ],
)
async def test_tokenize_count_equals_usage(
    http: aiohttp.ClientSession, mock: RunningMock, request_body: dict[str, Any]
) -> None:
    status, tokenized = await post(http, mock, "/tokenize", {"model": "mock-small", **request_body})
    assert status == 200
    assert list(tokenized) == ["count", "max_model_len", "tokens", "token_strs"]
    assert tokenized["max_model_len"] == 4096 and tokenized["token_strs"] is None
    assert len(tokenized["tokens"]) == tokenized["count"]
    assert all(isinstance(t, int) for t in tokenized["tokens"])
    status, with_strs = await post(
        http, mock, "/tokenize", {"model": "mock-small", "return_token_strs": True, **request_body}
    )
    assert len(with_strs["token_strs"]) == tokenized["count"]
    path = "/v1/chat/completions" if "messages" in request_body else "/v1/completions"
    _, body = await post(http, mock, path, {"model": "mock-small", **request_body})
    assert tokenized["count"] == body["usage"]["prompt_tokens"]


# --- openai SDK ---


async def test_openai_sdk_chat(oai: openai.AsyncOpenAI) -> None:
    reply = await oai.chat.completions.create(model="mock-small", messages=MESSAGES, max_tokens=4)  # type: ignore[arg-type]
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage is not None
    assert reply.usage.prompt_tokens == count_chat_prompt(MESSAGES)
    assert reply.usage.completion_tokens == 4 == count_text(reply.choices[0].message.content or "")

    chunks = [c async for c in await oai.chat.completions.create(model="mock-small", messages=MESSAGES, stream=True)]  # type: ignore[arg-type]
    assert all(c.usage is None for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "stop"

    chunks = [
        c
        async for c in await oai.chat.completions.create(
            model="mock-small",
            messages=MESSAGES,  # type: ignore[arg-type]
            stream=True,
            stream_options={"include_usage": True},
            n=2,
        )
    ]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert all(c.usage is None for c in chunks[:-1])
    streamed = sum(1 for c in chunks for choice in c.choices if choice.delta.content)
    assert chunks[-1].usage.completion_tokens == streamed
    assert chunks[-1].usage.prompt_tokens == count_chat_prompt(MESSAGES)


async def test_openai_sdk_completions_and_embeddings(
    oai: openai.AsyncOpenAI, http: aiohttp.ClientSession, mock: RunningMock
) -> None:
    reply = await oai.completions.create(model="mock-large", prompt="Say something", max_tokens=30)
    assert reply.usage is not None and reply.usage.prompt_tokens == 2
    assert reply.usage.completion_tokens == count_text(reply.choices[0].text)
    chunks = [
        c
        async for c in await oai.completions.create(
            model="mock-large", prompt="Say something", stream=True, stream_options={"include_usage": True}
        )
    ]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == len(chunks) - 1

    # The SDK asks for base64 by default and decodes it; the floats must match the float format.
    embedded = await oai.embeddings.create(model="mock-embed", input=["one", "two three"])
    assert embedded.usage.prompt_tokens == 3
    _, floats = await post(http, mock, "/v1/embeddings", {"model": "mock-embed", "input": ["one", "two three"]})
    assert [list(d.embedding) for d in embedded.data] == [d["embedding"] for d in floats["data"]]


async def test_openai_sdk_errors(oai: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as not_found:
        await oai.chat.completions.create(model="nope", messages=MESSAGES)  # type: ignore[arg-type]
    assert not_found.value.status_code == 404
    with pytest.raises(openai.BadRequestError):
        await oai.chat.completions.create(model="mock-small", messages=MESSAGES, max_tokens=5000)  # type: ignore[arg-type]
    models = await oai.models.list()
    assert [m.id for m in models.data] == ["mock-small", "mock-large", "mock-embed"]


# --- errors ---


VALIDATION = "Bad Request"  # vLLM's type for a request that does not fit its request model (pydantic)
CHECK = "BadRequestError"  # and for one that fails vLLM's own checks afterwards


@pytest.mark.parametrize(
    ("path", "body", "err_type", "param"),
    [
        # pydantic: lax types, the first error's location as param
        ("/v1/chat/completions", {"model": "mock-small", "messages": "hi"}, VALIDATION, "body.messages"),
        ("/v1/chat/completions", {"model": "mock-small"}, VALIDATION, "body.messages"),
        ("/v1/chat/completions", chat(max_tokens="many"), VALIDATION, "body.max_tokens"),
        ("/v1/chat/completions", chat(max_tokens=[1]), VALIDATION, "body.max_tokens"),
        ("/v1/chat/completions", chat(max_completion_tokens="x"), VALIDATION, "body.max_completion_tokens"),
        ("/v1/chat/completions", chat(stream="maybe"), VALIDATION, "body.stream"),
        ("/v1/chat/completions", chat(stream=2), VALIDATION, "body.stream"),
        ("/v1/chat/completions", chat(n=1.5), VALIDATION, "body.n"),
        ("/v1/chat/completions", chat(seed=2**64), VALIDATION, "body.seed"),
        ("/v1/chat/completions", chat(model=5), VALIDATION, "body.model"),
        ("/v1/chat/completions", chat(stream=True, stream_options=5), VALIDATION, "body.stream_options"),
        (
            "/v1/chat/completions",
            chat(stream=True, stream_options={"include_usage": "perhaps"}),
            VALIDATION,
            "body.stream_options.include_usage",
        ),
        ("/v1/chat/completions", {"model": 5, "max_tokens": "x"}, VALIDATION, "body.messages"),  # in field order
        ("/v1/chat/completions", chat(messages=[1]), VALIDATION, "body.messages.0.ChatCompletionDeveloperMessageParam"),
        (
            "/v1/chat/completions",
            chat(messages=[{"content": "x"}]),
            VALIDATION,
            "body.messages.0.ChatCompletionDeveloperMessageParam.role",
        ),
        (
            "/v1/chat/completions",
            chat(messages=[{"role": "user", "content": 5}]),
            VALIDATION,
            "body.messages.0.ChatCompletionDeveloperMessageParam.content",
        ),
        ("/v1/completions", {"model": "mock-small", "prompt": {"a": 1}}, VALIDATION, "body.prompt"),
        ("/v1/completions", {"model": "mock-small", "prompt": [1.5]}, VALIDATION, "body.prompt.0"),
        ("/v1/completions", {"model": "mock-small", "prompt": "x", "n": None}, VALIDATION, "body.n"),
        ("/v1/embeddings", {"model": "mock-embed"}, VALIDATION, "body.input"),
        (
            "/v1/embeddings",
            {"model": "mock-embed", "input": "x", "encoding_format": "hex"},
            VALIDATION,
            "body.encoding_format",
        ),
        ("/tokenize", {"model": "mock-small"}, VALIDATION, "body.prompt"),
        # vLLM's checks: its wording, the bare field name (or null) as param
        ("/v1/chat/completions", chat(max_tokens=0), CHECK, "max_tokens"),
        ("/v1/chat/completions", chat(max_completion_tokens=0), CHECK, "max_tokens"),
        ("/v1/chat/completions", chat(max_tokens=5000), CHECK, "max_tokens"),
        ("/v1/chat/completions", chat(max_tokens=3, max_completion_tokens=5000), CHECK, "max_completion_tokens"),
        ("/v1/chat/completions", chat(n=0), CHECK, None),
        ("/v1/chat/completions", chat(messages=[]), CHECK, None),
        ("/v1/completions", {"model": "mock-small"}, CHECK, "prompt"),
        ("/v1/completions", {"model": "mock-small", "prompt": ""}, CHECK, "prompt"),
        ("/v1/completions", {"model": "mock-small", "prompt": []}, CHECK, None),
        ("/v1/completions", {"model": "mock-small", "prompt": [[]]}, CHECK, None),
        (
            "/v1/completions",
            {"model": "mock-small", "prompt": "x", "stream_options": {"a": 1}},
            CHECK,
            "stream_options",
        ),
    ],
)
async def test_bad_requests(
    http: aiohttp.ClientSession, mock: RunningMock, path: str, body: Any, err_type: str, param: str | None
) -> None:
    status, error = await post(http, mock, path, body)
    assert status == 400
    assert list(error) == ["error"]
    assert list(error["error"]) == ["message", "type", "param", "code"]
    assert (error["error"]["type"], error["error"]["param"], error["error"]["code"]) == (err_type, param, 400)
    if err_type == VALIDATION:
        assert re.fullmatch(r"\d+ validation errors?:\n  \{'type': .*", error["error"]["message"], re.DOTALL)


async def test_error_messages_are_vllms(http: aiohttp.ClientSession, mock: RunningMock) -> None:
    async def message(path: str, body: Any) -> str:
        _, error = await post(http, mock, path, body)
        return str(error["error"]["message"])

    assert await message("/v1/chat/completions", chat(max_tokens="many")) == (
        "1 validation error:\n  {'type': 'int_parsing', 'loc': 'body.max_tokens', 'msg': 'Input should be a valid "
        "integer, unable to parse string as an integer', 'input': 'many'}"
    )
    assert await message("/v1/chat/completions", {"model": 5, "max_tokens": "x"}) == (
        "3 validation errors:\n"
        "  {'type': 'missing', 'loc': 'body.messages', 'msg': 'Field required', 'input': '<dict of 2 items>'}\n"
        "  {'type': 'string_type', 'loc': 'body.model', 'msg': 'Input should be a valid string', 'input': '5'}\n"
        "  {'type': 'int_parsing', 'loc': 'body.max_tokens', 'msg': 'Input should be a valid integer, unable to "
        "parse string as an integer', 'input': 'x'}"
    )
    assert await message("/v1/chat/completions", chat(max_tokens=5000)) == (
        "max_tokens=5000 cannot be greater than max_model_len=4096. Please request fewer output tokens. "
        "(parameter=max_tokens, value=5000)"
    )
    assert await message("/v1/chat/completions", chat(max_tokens=-1)) == (
        "max_tokens must be at least 1, got -1. (parameter=max_tokens, value=-1)"
    )
    assert await message("/v1/chat/completions", chat(n=0)) == "n must be at least 1, got 0."
    assert await message("/v1/chat/completions", chat(messages=[])) == (
        "Cannot apply chat template to an empty conversation. Provide at least one message."
    )
    assert await message("/v1/completions", {"prompt": ""}) == (
        "Either prompt or prompt_embeds must be provided and non-empty. (parameter=prompt)"
    )
    # Lax types: numeric strings, integral floats, true and "yes" are what pydantic makes of them.
    status, body = await post(http, mock, "/v1/chat/completions", chat(max_tokens="3", n=2.0, seed="7"))
    assert status == 200 and body["usage"]["completion_tokens"] == 6
    status, body = await post(http, mock, "/v1/chat/completions", chat(max_tokens=True))
    assert status == 200 and body["usage"]["completion_tokens"] == 1
    events = await stream(http, mock, "/v1/chat/completions", chat(stream="yes", max_tokens=2))
    assert events[-1] == "[DONE]"


async def test_check_order_follows_vllm(http: aiohttp.ClientSession, mock: RunningMock) -> None:
    """Types, then stream_options, the model, max_tokens, an empty prompt, the context, n, max_tokens left."""

    async def param(path: str, body: Any) -> tuple[int, Any]:
        status, error = await post(http, mock, path, body)
        return status, error["error"]["param"]

    assert await param("/v1/chat/completions", {"model": "nope", "max_tokens": "x"}) == (400, "body.messages")
    assert await param("/v1/chat/completions", chat(model="nope", stream_options={"include_usage": True})) == (
        400,
        "stream_options",
    )
    assert await param("/v1/chat/completions", chat(model="nope", max_tokens=0)) == (404, "model")
    assert await param("/v1/chat/completions", chat(messages=[], max_tokens=5000)) == (400, "max_tokens")
    assert await param("/v1/chat/completions", chat(messages=[], n=0)) == (400, None)
    assert await param("/v1/chat/completions", chat(max_tokens=0, n=0)) == (400, None)  # n's error
    long = list(range(5000))
    assert await param("/v1/completions", {"prompt": long, "max_tokens": 5000}) == (400, "max_tokens")
    assert await param("/v1/completions", {"prompt": long, "n": 0}) == (400, "input_tokens")
    assert await param("/v1/completions", {"prompt": "", "stream_options": {"include_usage": True}}) == (400, "prompt")


async def test_media_type_must_be_json(http: aiohttp.ClientSession, mock: RunningMock) -> None:
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/tokenize"):
        async with http.post(f"{mock.url}{path}", data=b"{}", headers={"Content-Type": "text/plain"}) as resp:
            assert resp.status == 400
            assert await resp.json() == {
                "error": {
                    "message": "1 validation error:\n  Unsupported Media Type: Only 'application/json' is allowed",
                    "type": "Bad Request",
                    "param": None,
                    "code": 400,
                }
            }
    raw = orjson.dumps(chat(max_tokens=1))
    headers = {"Content-Type": "application/json; charset=utf-8"}
    async with http.post(f"{mock.url}/v1/chat/completions", data=raw, headers=headers) as resp:
        assert resp.status == 200


async def test_malformed_json_and_unknown_model(http: aiohttp.ClientSession, mock: RunningMock) -> None:
    json_headers = {"Content-Type": "application/json"}
    async with http.post(f"{mock.url}/v1/chat/completions", data=b"{not json", headers=json_headers) as resp:
        assert resp.status == 400
        assert await resp.json() == {
            "error": {
                "message": "1 validation error:\n  {'type': 'json_invalid', 'loc': 'body.1', 'msg': 'JSON decode "
                "error', 'input': '<dict of 0 items>', 'ctx': {'error': 'Expecting property name enclosed in "
                "double quotes'}}",
                "type": "Bad Request",
                "param": "body.1",
                "code": 400,
            }
        }
    async with http.post(f"{mock.url}/v1/completions", data=b"[1, 2]", headers=json_headers) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"]["param"] == "body"
    status, error = await post(http, mock, "/v1/chat/completions", {"model": "nope", "messages": MESSAGES})
    assert status == 404
    assert error == {
        "error": {
            "message": "The model `nope` does not exist. Valid aliases: mock-small, mock-large, mock-embed.",
            "type": "NotFoundError",
            "param": "model",
            "code": 404,
        }
    }


async def test_unknown_and_null_fields_are_accepted(http: aiohttp.ClientSession, mock: RunningMock) -> None:
    status, body = await post(
        http,
        mock,
        "/v1/chat/completions",
        chat(
            stop=["\n"],
            logprobs=True,
            top_logprobs=2,
            tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}],
            tool_choice="auto",
            temperature=0.2,
            max_tokens=None,
            stream=None,
            stream_options=None,
            n=None,
            seed=None,
            some_future_field={"x": 1},
        ),
    )
    assert status == 200 and body["choices"][0]["finish_reason"] == "stop"
    # No model: the first served model answers, as in vLLM.
    status, body = await post(http, mock, "/v1/chat/completions", {"messages": MESSAGES})
    assert status == 200 and body["model"] == "mock-small"


async def test_context_length(http: aiohttp.ClientSession) -> None:
    """vLLM 0.32: max_tokens above max_model_len fails; a prompt longer than the context fails; a request
    for more than what the prompt leaves gets what is left."""
    short = [{"role": "user", "content": "hi"}]  # 3 + 1 + 1, plus 3 priming: 8 tokens
    async with serve(MockConfig(max_model_len=20)) as small:
        status, error = await post(http, small, "/v1/chat/completions", chat(messages=short, max_tokens=21))
        assert (status, error["error"]["param"]) == (400, "max_tokens")
        status, body = await post(http, small, "/v1/chat/completions", chat(messages=short, max_tokens=20))
        assert status == 200
        assert body["usage"]["completion_tokens"] == 12 and body["choices"][0]["finish_reason"] == "length"
        # A text prompt counts up to one token past the context ("at least"); token ids count exactly.
        status, error = await post(http, small, "/v1/completions", {"prompt": "word " * 30})
        assert (status, error["error"]["param"]) == (400, "input_tokens")
        assert error["error"]["message"] == (
            "This model's maximum context length is 20 tokens. However, your prompt contains at least 21 input "
            "tokens, which exceeds this limit even without any output tokens. Please reduce the length of the "
            "input prompt. (parameter=input_tokens, value=21)"
        )
        _, error = await post(http, small, "/v1/completions", {"prompt": list(range(25))})
        assert "your prompt contains 25 input tokens" in error["error"]["message"]
        # A prompt that fills the context leaves no token to generate.
        status, error = await post(http, small, "/v1/completions", {"prompt": list(range(20)), "max_tokens": 1})
        assert (status, error["error"]["param"]) == (400, "max_tokens")
        assert error["error"]["message"] == "max_tokens must be at least 1, got 0. (parameter=max_tokens, value=0)"
        # Without max_tokens the reply is bounded by what is left of the context.
        prompt = "word " * 17
        _, body = await post(http, small, "/v1/completions", {"prompt": prompt, "max_tokens": None})
        assert body["usage"]["completion_tokens"] == 3
        assert body["choices"][0]["finish_reason"] == "length"


# --- small routes ---


async def test_health_version_models(http: aiohttp.ClientSession, mock: RunningMock) -> None:
    async with http.get(f"{mock.url}/health") as resp:
        assert resp.status == 200 and await resp.read() == b""
    async with http.get(f"{mock.url}/version") as resp:
        assert await resp.json() == {"version": "mock"}
    async with http.get(f"{mock.url}/v1/models") as resp:
        models = await resp.json()
    assert models["object"] == "list"
    first = models["data"][0]
    assert list(first) == [
        "id",
        "object",
        "created",
        "owned_by",
        "root",
        "parent",
        "max_model_len",
        "permission",
    ]
    assert (first["id"], first["object"], first["owned_by"], first["root"], first["parent"]) == (
        "mock-small",
        "model",
        "vllm",
        "mock-small",
        None,
    )
    assert first["max_model_len"] == 4096
    assert first["permission"][0]["object"] == "model_permission"
    assert re.fullmatch(r"modelperm-[0-9a-f]{16}", first["permission"][0]["id"])
    # Unknown routes and methods: Starlette's JSON answers.
    async with http.get(f"{mock.url}/v1/nothing") as resp:
        assert (resp.status, await resp.json()) == (404, {"detail": "Not Found"})
    async with http.get(f"{mock.url}/v1/chat/completions") as resp:
        assert (resp.status, await resp.json()) == (405, {"detail": "Method Not Allowed"})
        assert resp.headers["Allow"] == "POST"


# --- metrics ---


async def scrape(http: aiohttp.ClientSession, mock: RunningMock) -> dict[tuple[str, frozenset[Any]], float]:
    async with http.get(f"{mock.url}/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = await resp.text()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def small(**labels: str) -> frozenset[Any]:
    return frozenset({"model_name": "mock-small", **labels}.items())


async def test_metrics(http: aiohttp.ClientSession, mock: RunningMock) -> None:
    before = await scrape(http, mock)
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"):
        assert before[(name, small())] == 0.0
    assert before[("vllm:request_success_total", small(finished_reason="stop"))] == 0.0
    long_user = {"role": "user", "content": " ".join(f"w{i}" for i in range(100))}
    _, first = await post(http, mock, "/v1/chat/completions", chat(messages=[long_user]))
    await post(http, mock, "/v1/chat/completions", chat(messages=[long_user], max_tokens=2))
    after = await scrape(http, mock)
    prompt = count_chat_prompt([long_user])
    assert after[("vllm:prompt_tokens_total", small())] == 2 * prompt
    generated = first["usage"]["completion_tokens"] + 2
    assert after[("vllm:generation_tokens_total", small())] == generated
    assert after[("vllm:request_success_total", small(finished_reason="stop"))] == 1
    assert after[("vllm:request_success_total", small(finished_reason="length"))] == 1
    assert after[("vllm:prefix_cache_queries_total", small())] == 2 * prompt
    # The second, identical prompt hits every full 16-token block the first one cached.
    assert after[("vllm:prefix_cache_hits_total", small())] == prompt - prompt % 16

    async with http.post(f"{mock.url}/mock/load", json={"running": 7, "kv_cache_usage_perc": 0.5}) as resp:
        assert resp.status == 200
    overridden = await scrape(http, mock)
    assert overridden[("vllm:num_requests_running", small())] == 7
    assert overridden[("vllm:num_requests_waiting", small())] == 0  # null keeps the real value
    assert overridden[("vllm:kv_cache_usage_perc", small())] == 0.5
    async with http.post(f"{mock.url}/mock/load", json={"model": "mock-large", "waiting": 3}) as resp:
        assert resp.status == 200
    overridden = await scrape(http, mock)
    large = frozenset({"model_name": "mock-large"}.items())
    assert overridden[("vllm:num_requests_waiting", large)] == 3
    assert overridden[("vllm:num_requests_running", large)] == 0
    async with http.delete(f"{mock.url}/mock/load") as resp:
        assert resp.status == 200
    assert (await scrape(http, mock))[("vllm:num_requests_running", small())] == 0


async def test_max_num_seqs_queue(http: aiohttp.ClientSession) -> None:
    async with serve(MockConfig(max_num_seqs=1)) as mock:
        state = mock.state
        # The first request holds the only slot (it stalls mid-stream); the second must wait.
        state.faults.replace({"faults": [{"mode": "stall_after", "after_tokens": 1, "times": 1}]})
        holder = await http.post(f"{mock.url}/v1/chat/completions", json=chat(stream=True))
        await state.wait_for(lambda: state.stalled == 1)
        queued = asyncio.create_task(post(http, mock, "/v1/chat/completions", chat()))
        await state.wait_for(lambda: state.engines["mock-small"].waiting == 1)
        samples = await scrape(http, mock)
        assert samples[("vllm:num_requests_running", small())] == 1
        assert samples[("vllm:num_requests_waiting", small())] == 1
        assert samples[("vllm:kv_cache_usage_perc", small())] == 1.0
        assert not queued.done()
        holder.close()  # hang up: the slot goes to the waiting request
        status, _ = await queued
        assert status == 200
        stats = state.stats()
        assert (stats["running"], stats["waiting"], stats["cancelled"], stats["completed"]) == (0, 0, 1, 1)


# --- faults ---


async def set_faults(http: aiohttp.ClientSession, mock: RunningMock, *faults: dict[str, Any]) -> None:
    async with http.post(f"{mock.url}/mock/faults", json={"faults": list(faults)}) as resp:
        assert resp.status == 200, await resp.text()


async def test_fault_error(http: aiohttp.ClientSession, mock: RunningMock) -> None:
    await set_faults(
        http,
        mock,
        {"mode": "error", "status": 503, "headers": {"Retry-After": "2"}, "times": 1},
        {"mode": "error", "status": 429, "body": {"detail": "custom"}, "times": 1, "model": "mock-large"},
    )
    async with http.post(f"{mock.url}/v1/chat/completions", json=chat()) as resp:
        assert resp.status == 503
        assert resp.headers["Retry-After"] == "2"
        body = await resp.json()
    assert body["error"]["type"] == "ServiceUnavailableError" and body["error"]["code"] == 503
    status, _ = await post(http, mock, "/v1/chat/completions", chat())  # times=1 used up; 2nd is for mock-large
    assert status == 200
    status, body = await post(http, mock, "/v1/chat/completions", chat(model="mock-large"))
    assert (status, body) == (429, {"detail": "custom"})
    status, _ = await post(http, mock, "/v1/chat/completions", chat(model="mock-large"))
    assert status == 200
    async with http.get(f"{mock.url}/mock/faults") as resp:
        assert [f["times"] for f in (await resp.json())["faults"]] == [0, 0]


async def test_fault_error_forever_and_openai_retry_after(http: aiohttp.ClientSession, mock: RunningMock) -> None:
    await set_faults(http, mock, {"mode": "error", "status": 500, "times": None})
    for _ in range(3):
        status, body = await post(http, mock, "/v1/embeddings", {"model": "mock-embed", "input": "x"})
        assert status == 500 and body["error"]["type"] == "InternalServerError"
    async with http.delete(f"{mock.url}/mock/faults") as resp:
        assert resp.status == 200
    status, _ = await post(http, mock, "/v1/embeddings", {"model": "mock-embed", "input": "x"})
    assert status == 200


async def test_fault_stall_then_client_cancel(http: aiohttp.ClientSession, mock: RunningMock) -> None:
    state = mock.state
    await set_faults(http, mock, {"mode": "stall", "times": 1})
    request = asyncio.create_task(
        http.post(f"{mock.url}/v1/chat/completions", json=chat(), headers={"X-Request-Id": "stalled-1"})
    )
    await state.wait_for(lambda: state.stalled == 1)
    request.cancel()  # the client gives up: its connection closes
    with pytest.raises(asyncio.CancelledError):
        await request
    await state.wait_for(lambda: state.cancelled == 1)
    async with http.get(f"{mock.url}/mock/stats") as resp:
        stats = await resp.json()
    assert stats["cancelled"] == 1 and stats["stalled"] == 0 and stats["completed"] == 0
    async with http.get(f"{mock.url}/mock/cancelled") as resp:
        assert await resp.json() == [{"request_id": "stalled-1", "generated_tokens": 0}]


async def test_fault_stall_after_streams_k_chunks(http: aiohttp.ClientSession, mock: RunningMock) -> None:
    state = mock.state
    await set_faults(http, mock, {"mode": "stall_after", "after_tokens": 3, "times": 1})
    resp = await http.post(f"{mock.url}/v1/chat/completions", json=chat(stream=True), headers={"X-Request-Id": "sa-1"})
    lines = []
    while len(lines) < 4:  # the role chunk and 3 token chunks
        line = await resp.content.readline()
        if line.strip():
            lines.append(json.loads(line.removeprefix(b"data: ")))
    await state.wait_for(lambda: state.stalled == 1)
    assert [bool(c["choices"][0]["delta"].get("content")) for c in lines] == [False, True, True, True]
    resp.close()
    await state.wait_for(lambda: state.cancelled == 1)
    assert list(state.cancelled_log) == [{"request_id": "sa-1", "generated_tokens": 3}]


async def test_fault_drop_after_breaks_the_stream(http: aiohttp.ClientSession, mock: RunningMock) -> None:
    await set_faults(http, mock, {"mode": "drop_after", "after_tokens": 2, "times": 2})
    events: list[bytes] = []
    async with http.post(f"{mock.url}/v1/chat/completions", json=chat(stream=True)) as resp:
        assert resp.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            async for line in resp.content:
                if line.strip():
                    events.append(line)
    assert len(events) == 3  # the role chunk and 2 token chunks, then the connection is gone
    assert all(b"[DONE]" not in e for e in events)

    client = openai.AsyncOpenAI(base_url=f"{mock.url}/v1", api_key="x", max_retries=0)
    try:
        chunks = []
        with pytest.raises(openai.APIError):
            async for chunk in await client.completions.create(model="mock-small", prompt="hi", stream=True):
                chunks.append(chunk)
        assert len(chunks) == 2
    finally:
        await client.close()
    stats = mock.state.stats()
    assert (stats["dropped"], stats["cancelled"], stats["generated_tokens"]) == (2, 0, 4)


async def test_fault_drop_after_non_streaming(http: aiohttp.ClientSession, mock: RunningMock) -> None:
    await set_faults(http, mock, {"mode": "drop_after", "after_tokens": 1, "times": 1})
    with pytest.raises(aiohttp.ClientError):
        await post(http, mock, "/v1/chat/completions", chat())
    status, _ = await post(http, mock, "/v1/chat/completions", chat())
    assert status == 200


async def test_fault_slow(http: aiohttp.ClientSession, mock: RunningMock) -> None:
    loop = asyncio.get_running_loop()
    await set_faults(http, mock, {"mode": "slow", "ttft_ms": 150, "tokens_per_second": 1000, "times": 1})
    started = loop.time()
    events = await stream(http, mock, "/v1/chat/completions", chat())
    assert loop.time() - started >= 0.15
    assert events[-1] == "[DONE]"
    async with http.get(f"{mock.url}/mock/faults") as resp:
        assert (await resp.json())["faults"][0]["times"] == 0  # used up: later requests are not slowed


async def test_bad_fault_list_is_rejected(http: aiohttp.ClientSession, mock: RunningMock) -> None:
    for body in ({"faults": [{"mode": "explode"}]}, {"faults": [{"mode": "error", "times": -1}]}, [1]):
        async with http.post(f"{mock.url}/mock/faults", json=body) as resp:
            assert resp.status == 400
    async with http.get(f"{mock.url}/mock/faults") as resp:
        assert await resp.json() == {"faults": []}


# --- cancellation with pacing ---


async def test_cancel_mid_stream_records_sent_tokens(http: aiohttp.ClientSession) -> None:
    async with serve(MockConfig(tokens_per_second=40)) as mock:
        state = mock.state
        resp = await http.post(
            f"{mock.url}/v1/chat/completions", json=chat(stream=True), headers={"X-Request-Id": "mid"}
        )
        received = 0
        while received < 3:  # role chunk + 2 tokens
            if (await resp.content.readline()).strip():
                received += 1
        resp.close()
        await state.wait_for(lambda: state.cancelled == 1)
        (record,) = state.cancelled_log
        assert record["request_id"] == "mid"
        assert 2 <= record["generated_tokens"] < MIN_NATURAL_TOKENS
        assert state.stats()["running"] == 0


async def test_cancel_non_streaming_while_generating(http: aiohttp.ClientSession) -> None:
    async with serve(MockConfig(ttft_ms=50, tokens_per_second=20)) as mock:
        state = mock.state
        request = asyncio.create_task(post(http, mock, "/v1/chat/completions", chat()))
        await state.wait_for(lambda: state.engines["mock-small"].running == 1)
        request.cancel()
        with pytest.raises(asyncio.CancelledError):
            await request
        await state.wait_for(lambda: state.cancelled == 1)
        (record,) = state.cancelled_log
        assert 0 <= record["generated_tokens"] < MIN_NATURAL_TOKENS
        assert state.stats()["completed"] == 0


async def test_pacing_and_latency(http: aiohttp.ClientSession) -> None:
    # Only lower bounds are asserted: a loaded machine may be slower, never faster.
    loop = asyncio.get_running_loop()
    async with serve(MockConfig(ttft_ms=60, tokens_per_second=200, latency_ms=40)) as mock:
        started = loop.time()
        _, body = await post(http, mock, "/v1/chat/completions", chat(max_tokens=9))
        assert loop.time() - started >= 0.06 + 8 / 200 + 0.04
        assert body["usage"]["completion_tokens"] == 9
        started = loop.time()
        arrivals = []
        async with http.post(f"{mock.url}/v1/chat/completions", json=chat(max_tokens=5, stream=True)) as resp:
            async for line in resp.content:
                if line.strip():
                    arrivals.append(loop.time() - started)
        assert len(arrivals) == 1 + 5 + 1  # role, tokens, [DONE]
        assert arrivals[0] >= 0.06  # the role chunk waits for the first token
        assert arrivals[-1] >= 0.06 + 4 / 200  # no latency_ms on streams


# --- control plane ---


async def test_request_log_and_reset(http: aiohttp.ClientSession, mock: RunningMock) -> None:
    await post(http, mock, "/v1/chat/completions", chat(), headers={"X-Request-Id": "log-1", "X-Custom": "v"})
    async with http.post(f"{mock.url}/v1/completions", data=b"not json") as resp:
        assert resp.status == 400
    async with http.get(f"{mock.url}/mock/requests") as resp:
        log = await resp.json()
    assert [(r["method"], r["path"]) for r in log] == [
        ("POST", "/v1/chat/completions"),
        ("POST", "/v1/completions"),
    ]
    assert log[0]["body"] == chat()
    assert log[0]["headers"]["x-request-id"] == "log-1" and log[0]["headers"]["x-custom"] == "v"
    assert log[1]["body"] is None
    async with http.get(f"{mock.url}/mock/stats") as resp:
        stats = await resp.json()
    assert stats["requests"] == 2 and stats["completed"] == 1 and stats["errors"] == 1
    assert stats["generated_tokens"] > 0
    async with http.delete(f"{mock.url}/mock/requests") as resp:
        assert resp.status == 200
    async with http.get(f"{mock.url}/mock/requests") as resp:
        assert await resp.json() == []
    async with http.get(f"{mock.url}/mock/stats") as resp:
        assert await resp.json() == {
            "requests": 0,
            "completed": 0,
            "cancelled": 0,
            "dropped": 0,
            "errors": 0,
            "running": 0,
            "waiting": 0,
            "stalled": 0,
            "generated_tokens": 0,
        }
    await set_faults(http, mock, {"mode": "error", "status": 500})
    async with http.post(f"{mock.url}/mock/reset") as resp:
        assert resp.status == 200
    status, _ = await post(http, mock, "/v1/chat/completions", chat())
    assert status == 200


# --- CLI (subprocess) ---


async def start_cli(*args: str) -> tuple[asyncio.subprocess.Process, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "backends.mock",
        "--port",
        "0",
        *args,
        cwd=REPO_ROOT,
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    assert proc.stdout is not None
    line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
    match = re.fullmatch(r"mock backend listening on (http://127\.0\.0\.1:(\d+))\n", line)
    assert match, line
    assert int(match.group(2)) > 0
    return proc, match.group(1)


async def stop_cli(proc: asyncio.subprocess.Process) -> int:
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
    assert proc.stdout is not None
    rest = await asyncio.wait_for(proc.stdout.read(), 10)
    assert rest == b""  # exactly one line on stdout
    return await asyncio.wait_for(proc.wait(), 10)


async def test_cli_prints_listening_line(http: aiohttp.ClientSession) -> None:
    proc, url = await start_cli("--models", "alpha,beta", "--max-model-len", "100", "--embedding-dim", "8")
    try:
        async with http.get(f"{url}/v1/models") as resp:
            models = await resp.json()
        assert [(m["id"], m["max_model_len"]) for m in models["data"]] == [("alpha", 100), ("beta", 100)]
        async with http.post(f"{url}/v1/embeddings", json={"model": "beta", "input": "x"}) as resp:
            assert len((await resp.json())["data"][0]["embedding"]) == 8
        async with http.post(f"{url}/v1/chat/completions", json={"model": "alpha", "messages": MESSAGES}) as resp:
            assert (await resp.json())["usage"]["prompt_tokens"] == count_chat_prompt(MESSAGES)
    finally:
        assert await stop_cli(proc) == 0


async def test_cli_workers_share_one_port(http: aiohttp.ClientSession) -> None:
    proc, url = await start_cli("--workers", "2")
    try:
        replies = await asyncio.gather(
            *(http.post(f"{url}/v1/chat/completions", json=chat(), headers={"Connection": "close"}) for _ in range(8))
        )
        for reply in replies:
            async with reply:
                assert reply.status == 200
    finally:
        assert await stop_cli(proc) == 0
