"""The official `openai` SDK against a real gateway process, unchanged but for `base_url` and `api_key`."""

from __future__ import annotations

import base64
import struct

import httpx
import openai
import pytest

from backends.mock.tokenizer import count_chat_prompt, count_text
from tests.harness import Database, Gateway, MockBackend, Tenant, make_tenant, wait_for

MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Name three colours, please."},
]


def sdk(gateway: Gateway, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.base_url, api_key=key, max_retries=0)


def last_backend_body(backend: MockBackend) -> dict:
    return backend.requests()[-1]["body"]


def test_chat_non_streaming(gateway: Gateway, backend: MockBackend, tenant: Tenant, database: Database) -> None:
    client = sdk(gateway, tenant.key)
    reply = client.chat.completions.with_raw_response.create(model="mock-small", messages=MESSAGES)
    completion = reply.parse()

    assert completion.object == "chat.completion"
    assert completion.model == "mock-small"
    assert completion.choices[0].message.role == "assistant"
    assert completion.choices[0].message.content
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == count_chat_prompt(MESSAGES)
    assert completion.usage.completion_tokens == count_text(completion.choices[0].message.content)
    assert reply.headers["x-gateway-request-id"]

    row = wait_for(lambda: _row(database, reply.headers["x-gateway-request-id"]), what="the usage row")
    assert row["prompt_tokens"] == completion.usage.prompt_tokens
    assert row["completion_tokens"] == completion.usage.completion_tokens
    assert row["usage_source"] == "backend"
    assert row["status_code"] == 200
    assert not row["streamed"]
    # 0.15 and 0.60 USD per million tokens are 150 and 600 nano-USD per token.
    expected = row["prompt_tokens"] * 150 + row["completion_tokens"] * 600
    assert row["cost_nanousd"] == expected
    assert row["key_id"] == tenant.key_id


def _row(database: Database, request_id: str) -> dict | None:
    rows = [
        row for row in database.usage_rows() if str(row["request_id"]).replace("-", "") == request_id.replace("-", "")
    ]
    return rows[0] if rows else None


@pytest.mark.parametrize("include_usage", [True, False])
def test_chat_streaming_usage_chunk_only_when_asked(
    gateway: Gateway, backend: MockBackend, tenant: Tenant, database: Database, include_usage: bool
) -> None:
    client = sdk(gateway, tenant.key)
    extra = {"stream_options": {"include_usage": True}} if include_usage else {}
    raw = client.chat.completions.with_raw_response.create(model="mock-small", messages=MESSAGES, stream=True, **extra)
    request_id = raw.headers["x-gateway-request-id"]
    chunks = list(raw.parse())

    usage_chunks = [chunk for chunk in chunks if chunk.usage is not None]
    content = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert content
    if include_usage:
        assert len(usage_chunks) == 1 and chunks[-1].usage is not None and chunks[-1].choices == []
        assert chunks[-1].usage.completion_tokens == count_text(content)
    else:
        assert usage_chunks == []
    # Whatever the client asked, the gateway asked the backend for usage and metered it.
    assert last_backend_body(backend)["stream_options"] == {"include_usage": True}
    row = wait_for(lambda: _row(database, request_id), what="the usage row")
    assert row["streamed"]
    assert row["usage_source"] == "backend"
    assert row["prompt_tokens"] == count_chat_prompt(MESSAGES)
    assert row["completion_tokens"] == count_text(content)
    assert row["first_token_ms"] is not None and row["first_token_ms"] <= row["duration_ms"]


def test_completions_plain_and_streaming(gateway: Gateway, backend: MockBackend, tenant: Tenant) -> None:
    client = sdk(gateway, tenant.key)
    completion = client.completions.create(model="mock-small", prompt="Once upon a time", max_tokens=5)
    assert completion.object == "text_completion"
    assert completion.usage.prompt_tokens == count_text("Once upon a time")
    assert completion.usage.completion_tokens == 5
    assert completion.choices[0].finish_reason == "length"

    stream = client.completions.create(
        model="mock-small",
        prompt="Once upon a time",
        max_tokens=5,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(chunk.choices[0].text for chunk in chunks if chunk.choices)
    assert text == completion.choices[0].text
    assert chunks[-1].usage.completion_tokens == 5


def test_embeddings_float_and_base64(
    gateway: Gateway, backend: MockBackend, tenant: Tenant, database: Database
) -> None:
    client = sdk(gateway, tenant.key)
    result = client.embeddings.create(model="mock-embed", input=["hello world", "good morning"])
    assert len(result.data) == 2
    assert all(len(item.embedding) == 16 for item in result.data)
    assert result.usage.prompt_tokens == count_text("hello world") + count_text("good morning")

    raw = httpx.post(
        f"{gateway.base_url}/embeddings",
        headers={"Authorization": f"Bearer {tenant.key}"},
        json={"model": "mock-embed", "input": "hello world", "encoding_format": "base64"},
    ).json()
    decoded = struct.unpack("<16f", base64.b64decode(raw["data"][0]["embedding"]))
    assert decoded == pytest.approx(result.data[0].embedding, rel=1e-6)


def test_models_lists_only_allowed_models(gateway: Gateway, database: Database) -> None:
    from tests.conftest import wait_key_known

    everything = make_tenant(database.engine)
    limited = make_tenant(database.engine, models=["mock-small"])
    wait_key_known(gateway, everything.key)
    wait_key_known(gateway, limited.key)

    all_ids = {model.id for model in sdk(gateway, everything.key).models.list()}
    assert {"mock-small", "mock-large", "mock-embed"} <= all_ids
    assert [model.id for model in sdk(gateway, limited.key).models.list()] == ["mock-small"]
    assert sdk(gateway, limited.key).models.retrieve("mock-small").id == "mock-small"
    with pytest.raises(openai.NotFoundError):
        sdk(gateway, limited.key).models.retrieve("mock-large")


def test_every_request_field_reaches_the_backend_unchanged(
    gateway: Gateway, backend: MockBackend, tenant: Tenant
) -> None:
    fields = {
        "model": "mock-small",
        "messages": [
            {"role": "system", "content": "sys"},
            {"role": "user", "content": [{"type": "text", "text": "hi"}], "name": "alice"},
        ],
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
        "tool_choice": "auto",
        "response_format": {"type": "json_object"},
        "logprobs": True,
        "top_logprobs": 2,
        "n": 2,
        "seed": 42,
        "stop": ["\n\n", "END"],
        "logit_bias": {"50256": -100},
        "user": "end-user-7",
        "functions": [{"name": "g", "parameters": {"type": "object"}}],
        "temperature": 0.3,
        "top_p": 0.9,
        "presence_penalty": 0.1,
        "frequency_penalty": 0.2,
        "max_tokens": 7,
        "metadata": {"trace": "abc"},
        "parallel_tool_calls": False,
        "vendor_extension": {"nested": [1, 2.5, None, "x"]},
    }
    response = httpx.post(
        f"{gateway.base_url}/chat/completions",
        headers={"Authorization": f"Bearer {tenant.key}", "x-request-id": "client-supplied-1"},
        json=fields,
    )
    assert response.status_code == 200, response.text
    assert response.headers["x-request-id"] == "client-supplied-1"
    received = backend.requests()[-1]
    assert received["body"] == fields
    assert tenant.key not in str(received["headers"])

    stream_fields = {**fields, "stream": True, "stream_options": {"continuous_usage_stats": False}}
    with httpx.stream(
        "POST",
        f"{gateway.base_url}/chat/completions",
        headers={"Authorization": f"Bearer {tenant.key}"},
        json=stream_fields,
    ) as streamed:
        body = streamed.read()
    assert body.endswith(b"data: [DONE]\n\n")
    received = backend.requests()[-1]["body"]
    # The only change: the gateway always asks for usage, keeping the client's other stream options.
    assert received == {**stream_fields, "stream_options": {"continuous_usage_stats": False, "include_usage": True}}


def test_served_model_name_is_rewritten_both_ways(gateway: Gateway, backend: MockBackend, tenant: Tenant) -> None:
    client = sdk(gateway, tenant.key)
    completion = client.chat.completions.create(model="renamed", messages=MESSAGES)
    assert completion.model == "renamed"
    assert last_backend_body(backend)["model"] == "mock-small"
    chunks = list(client.chat.completions.create(model="renamed", messages=MESSAGES, stream=True))
    assert {chunk.model for chunk in chunks} == {"renamed"}


def test_n_requests_make_exactly_n_usage_rows(gateway: Gateway, backend: MockBackend, database: Database) -> None:
    from tests.conftest import wait_key_known

    tenant = make_tenant(database.engine)
    wait_key_known(gateway, tenant.key)
    client = sdk(gateway, tenant.key)
    expected_prompt = expected_completion = 0
    for index in range(30):
        messages = [{"role": "user", "content": f"request number {index} " + "word " * index}]
        if index % 2:
            completion = client.chat.completions.create(model="mock-small", messages=messages)
            expected_completion += completion.usage.completion_tokens
            expected_prompt += completion.usage.prompt_tokens
        else:
            chunks = list(
                client.chat.completions.create(
                    model="mock-small", messages=messages, stream=True, stream_options={"include_usage": True}
                )
            )
            expected_completion += chunks[-1].usage.completion_tokens
            expected_prompt += chunks[-1].usage.prompt_tokens

    team_rows = lambda: [row for row in database.usage_rows() if row["key_id"] == tenant.key_id]  # noqa: E731
    rows = wait_for(lambda: len(team_rows()) >= 30 and team_rows(), what="30 usage rows")
    assert len(rows) == 30
    assert len({row["request_id"] for row in rows}) == 30
    assert sum(row["prompt_tokens"] for row in rows) == expected_prompt
    assert sum(row["completion_tokens"] for row in rows) == expected_completion
    assert backend.stats()["completed"] == 30
