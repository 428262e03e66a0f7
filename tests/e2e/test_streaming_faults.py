"""Streams that go wrong: the upstream dying or stalling mid-stream, and the client hanging up."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest

from tests.harness import Database, Gateway, MockBackend, Tenant, wait_for

CHAT = {"model": "mock-small", "messages": [{"role": "user", "content": "tell me a long story"}], "stream": True}


def read_events(response: httpx.Response) -> list[str]:
    body = response.read().decode()
    return [event for event in body.split("\n\n") if event]


@pytest.mark.parametrize(
    ("mode", "code"), [("drop_after", "upstream_unreachable"), ("stall_after", "upstream_timeout")]
)
def test_upstream_failure_mid_stream_is_an_error_event_then_done(
    gateway: Gateway, backend: MockBackend, tenant: Tenant, database: Database, mode: str, code: str
) -> None:
    backend.set_faults({"mode": mode, "after_tokens": 3, "times": 1})
    with httpx.stream(
        "POST",
        f"{gateway.base_url}/chat/completions",
        headers={"Authorization": f"Bearer {tenant.key}"},
        json=CHAT,
        timeout=10,
    ) as response:
        assert response.status_code == 200
        events = read_events(response)

    assert events[-1] == "data: [DONE]"
    error = json.loads(events[-2].removeprefix("data: "))["error"]
    assert error["code"] == code and error["message"] and "Traceback" not in events[-2]
    content = [json.loads(event.removeprefix("data: ")) for event in events[:-2]]
    assert sum(1 for chunk in content if chunk["choices"] and chunk["choices"][0]["delta"].get("content")) == 3

    row = wait_for(lambda: [r for r in database.usage_rows() if r["key_id"] == tenant.key_id], what="usage row")[0]
    assert row["status_code"] in (502, 504)
    assert row["usage_source"] == "counted"
    assert row["completion_tokens"] == 3

    # The SDK surfaces the error event as an exception.
    backend.set_faults({"mode": mode, "after_tokens": 2, "times": 1})
    client = openai.OpenAI(base_url=gateway.base_url, api_key=tenant.key, max_retries=0)
    with pytest.raises(openai.APIError):
        for _ in client.chat.completions.create(model="mock-small", messages=CHAT["messages"], stream=True):
            pass


def test_client_hang_up_cancels_upstream_and_still_meters(
    gateway: Gateway, backend: MockBackend, tenant: Tenant, database: Database
) -> None:
    backend.set_faults({"mode": "slow", "tokens_per_second": 50, "times": 1})
    client = openai.OpenAI(base_url=gateway.base_url, api_key=tenant.key, max_retries=0)
    stream = client.chat.completions.create(model="mock-small", messages=CHAT["messages"], stream=True, max_tokens=1000)
    received = 0
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            received += 1
        if received == 4:
            break
    stream.close()
    hung_up = time.monotonic()

    wait_for(lambda: backend.stats()["cancelled"] >= 1, timeout=5, what="the backend to see the cancellation")
    assert time.monotonic() - hung_up < 1.0, "the upstream request must be cancelled within a second"

    row = wait_for(lambda: [r for r in database.usage_rows() if r["key_id"] == tenant.key_id], what="usage row")[0]
    assert row["client_disconnected"]
    assert row["status_code"] == 499
    assert row["usage_source"] == "counted"
    assert row["prompt_tokens"] > 0
    generated = backend.cancelled()[-1]["generated_tokens"]
    # What we relayed is what the backend generated before it noticed, give or take the chunk in flight.
    assert received <= row["completion_tokens"] <= generated
    assert generated - row["completion_tokens"] <= 1


def test_client_hang_up_during_non_streaming_generation(
    gateway: Gateway, backend: MockBackend, tenant: Tenant, database: Database
) -> None:
    backend.set_faults({"mode": "slow", "ttft_ms": 30_000, "times": 1})
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            f"{gateway.base_url}/chat/completions",
            headers={"Authorization": f"Bearer {tenant.key}"},
            json={**CHAT, "stream": False},
            timeout=0.5,
        )
    wait_for(lambda: backend.stats()["cancelled"] >= 1, timeout=2, what="the backend to see the cancellation")
    row = wait_for(lambda: [r for r in database.usage_rows() if r["key_id"] == tenant.key_id], what="usage row")[0]
    assert row["client_disconnected"] and row["status_code"] == 499
