"""Admission beside the upstream request (`limits.overlap_admission`), through a real gateway, Redis and mock vLLM.

A key whose last admission left room to spare is sent upstream while Redis admits it; one that Redis then refuses
gets its 429 at once, the upstream sees its request cancelled, and no usage record is made. Grants are off here,
so that every request is admitted through Redis, and windows are a minute long, so no window slides mid-test.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from gateway import accounts
from gateway.limits.overrides import set_override
from tests.harness import (
    CHAT,
    PEPPER,
    LimitsEnv,
    MockBackend,
    RedisServer,
    Tenant,
    create_database,
    limits_config,
    metric_value,
    start_gateway,
    wait_for,
)

SLOW = 60_000  # ms before the mock answers, and the gateway's first-byte timeout: far longer than the client waits
CLIENT_TIMEOUT = 15.0  # a refusal that waited for the upstream would not come within this


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, mock_backend: MockBackend) -> Iterator[LimitsEnv]:
    tmp = Path(tmp_path_factory.mktemp("overlap"))
    database = create_database("sqlite", tmp)
    redis = RedisServer(tmp)
    redis.start()
    config = limits_config(
        database.url,
        mock_backend.url,
        redis.url,
        # Every key its own (generous) check, so that two keys of a team have scopes of their own.
        **{
            "limits.local_grants": False,
            "limits.window_seconds": 60,
            "limits.key": {"rpm": 1000},
            "timeouts.first_byte": SLOW / 1000,
            # A provider account (the mock again): a request to it is never sent before it is admitted.
            "models.mock-provider": {
                "deployments": [
                    {
                        "name": "provider",
                        "kind": "openai",
                        "base_url": f"{mock_backend.url}/v1",
                        "served_model": "mock-small",
                    }
                ]
            },
        },
    )
    gateway = start_gateway(tmp, config)
    yield LimitsEnv("redis", database, [gateway], redis)
    gateway.stop()
    assert "Traceback" not in gateway.log(), gateway.log()[-4000:]
    redis.stop()
    database.drop()


def second_key(env: LimitsEnv, tenant: Tenant) -> str:
    """Another key of the tenant's team (a user of its own)."""
    engine = env.database.engine
    user = f"user-{secrets.token_hex(4)}"
    accounts.create_user(engine, user)
    created = accounts.create_key(engine, PEPPER.encode(), team=tenant.team, user=user, name="second")
    env.sync()
    return created.secret


def overlaps(env: LimitsEnv, outcome: str) -> float:
    return metric_value(env.gateways[0], f'gateway_admission_overlaps_total{{outcome="{outcome}"}}')


def chat(env: LimitsEnv, key: str, *, stream: bool = False, model: str = "mock-small") -> httpx.Response:
    body = {"model": model, "messages": CHAT, "max_tokens": 5, "stream": stream}
    return httpx.post(
        f"{env.gateways[0].base_url}/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {key}"},
        timeout=CLIENT_TIMEOUT,
    )


def team_tenant(env: LimitsEnv, rpm: int) -> Tenant:
    tenant = env.tenant()
    set_override(env.database.engine, "team", tenant.team, {"rpm": rpm})
    env.sync()
    return tenant


def test_a_key_with_room_to_spare_is_admitted_beside_the_upstream_request(env: LimitsEnv, backend: MockBackend) -> None:
    tenant = team_tenant(env, rpm=100)
    before = overlaps(env, "admitted")
    remaining = []
    for index in range(6):
        response = chat(env, tenant.key, stream=index % 2 == 1)
        assert response.status_code == 200, response.text
        remaining.append(int(response.headers["x-ratelimit-remaining-requests"]))
        assert response.headers["x-ratelimit-limit-requests"] == "100"  # the team's, the tighter
    # The first admission had nothing to go on and came first; the other five ran beside the upstream request,
    # and their headers still count every request, as Redis saw it.
    assert overlaps(env, "admitted") - before == 5
    assert remaining == [99, 98, 97, 96, 95, 94]
    wait_for(lambda: env.database.count_usage(key_id=tenant.key_id) == 6, what="six usage records")
    assert len(backend.requests()) == 6


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_a_refusal_that_comes_while_the_upstream_works_cancels_it_and_leaves_no_record(
    env: LimitsEnv, backend: MockBackend, stream: bool
) -> None:
    tenant = team_tenant(env, rpm=8)
    other = second_key(env, tenant)
    assert chat(env, tenant.key).status_code == 200  # 7 of 8 left: room to spare
    for _ in range(7):  # the team's other key takes the rest
        assert chat(env, other).status_code == 200
    refused_before = overlaps(env, "refused")
    backend.set_faults({"mode": "slow", "ttft_ms": SLOW, "times": 1, "model": "mock-small"})

    response = chat(env, tenant.key, stream=stream)

    assert response.status_code == 429, response.text
    assert response.json()["error"]["code"] == "rate_limit_exceeded"
    assert response.headers["retry-after"] and response.headers["x-ratelimit-remaining-requests"] == "0"
    assert overlaps(env, "refused") - refused_before == 1
    # It had gone upstream (that is the overlap), and the refusal cancelled it there.
    wait_for(lambda: len(backend.cancelled()) == 1, what="the upstream to see its request cancelled")
    assert len(backend.requests()) == 9
    # The refused request has no usage record: the key's one admitted request has.
    wait_for(lambda: env.database.count_usage(key_id=tenant.key_id) >= 1, what="the first request's record")
    assert env.database.count_usage(key_id=tenant.key_id) == 1

    # After a refusal the key waits for its admission again: refused without reaching the upstream.
    again = chat(env, tenant.key, stream=stream)
    assert again.status_code == 429
    assert len(backend.requests()) == 9
    assert overlaps(env, "refused") - refused_before == 1


def test_a_request_to_a_provider_is_sent_only_once_admitted(env: LimitsEnv, backend: MockBackend) -> None:
    tenant = team_tenant(env, rpm=4)
    other = second_key(env, tenant)
    assert chat(env, tenant.key, model="mock-provider").status_code == 200  # room to spare
    for _ in range(3):
        assert chat(env, other).status_code == 200
    admitted_before = overlaps(env, "admitted")

    response = chat(env, tenant.key, model="mock-provider")

    assert response.status_code == 429, response.text
    assert len(backend.requests()) == 4  # the refused request never reached the provider
    assert backend.cancelled() == []
    # With room to spare the admission still overlaps the routing, and the request waits for it before it leaves.
    roomy = team_tenant(env, rpm=100)
    assert chat(env, roomy.key, model="mock-provider").status_code == 200
    assert chat(env, roomy.key, model="mock-provider").status_code == 200
    assert overlaps(env, "admitted") - admitted_before == 1
    assert len(backend.requests()) == 6


def test_an_upstream_failure_beside_an_admission_is_answered_and_recorded_as_before(
    env: LimitsEnv, backend: MockBackend
) -> None:
    tenant = team_tenant(env, rpm=100)
    assert chat(env, tenant.key).status_code == 200  # room to spare: the next one overlaps
    admitted_before = overlaps(env, "admitted")
    backend.set_faults({"mode": "error", "status": 500, "times": 5, "model": "mock-small"})

    response = chat(env, tenant.key)

    assert response.status_code >= 500, response.text
    assert overlaps(env, "admitted") - admitted_before == 1
    # Admitted, then failed upstream: one usage record, with the status the client got.
    wait_for(lambda: env.database.count_usage(key_id=tenant.key_id) == 2, what="the failed request's record")
    assert env.database.count_usage(key_id=tenant.key_id, status_code=response.status_code) == 1


def test_a_refusal_wins_over_an_upstream_failure_that_came_first(env: LimitsEnv, backend: MockBackend) -> None:
    tenant = team_tenant(env, rpm=8)
    other = second_key(env, tenant)
    assert chat(env, tenant.key).status_code == 200
    for _ in range(7):
        assert chat(env, other).status_code == 200
    backend.set_faults({"mode": "error", "status": 500, "times": 5, "model": "mock-small"})

    response = chat(env, tenant.key)

    # Not admitted: the client gets the 429 it would have got had the admission come first, not the upstream's
    # error, it is not retried elsewhere, and there is no record of it.
    assert response.status_code == 429, response.text
    assert len(backend.requests()) == 9
    wait_for(lambda: env.database.count_usage(key_id=tenant.key_id) >= 1, what="the first request's record")
    assert env.database.count_usage(key_id=tenant.key_id) == 1
