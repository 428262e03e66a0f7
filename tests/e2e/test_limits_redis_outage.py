"""Redis trouble: fail-closed and fail-open modes, automatic recovery, and budgets rebuilt from the ledger."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from gateway.limits.overrides import set_override
from tests.harness import (
    CHAT,
    LimitsEnv,
    MockBackend,
    RedisServer,
    create_database,
    limits_config,
    make_tenant,
    metric_value,
    start_gateway,
    wait_for,
)


@pytest.fixture(params=["fail_closed", "fail_open"])
def outage_env(request: pytest.FixtureRequest, tmp_path: Path, mock_backend: MockBackend) -> Iterator[LimitsEnv]:
    database = create_database("sqlite", tmp_path)
    redis = RedisServer(tmp_path)
    redis.start()
    config = limits_config(
        database.url, mock_backend.url, redis.url, **{"redis.fail_open": request.param == "fail_open"}
    )
    gateway = start_gateway(tmp_path, config)
    yield LimitsEnv(request.param, database, [gateway], redis)
    gateway.stop()
    assert "Traceback" not in gateway.log()
    redis.stop()
    database.drop()


def chat(env: LimitsEnv, key: str, max_tokens: int = 5) -> httpx.Response:
    return httpx.post(
        f"{env.gateways[0].base_url}/chat/completions",
        headers={"Authorization": f"Bearer {key}"},
        json={"model": "mock-small", "messages": CHAT, "max_tokens": max_tokens},
        timeout=10,
    )


def metric(env: LimitsEnv, name: str) -> float:
    return metric_value(env.gateways[0], name)


def test_redis_outage_and_recovery(outage_env: LimitsEnv, backend: MockBackend) -> None:
    env = outage_env
    assert env.redis is not None
    tenant = env.tenant(tpm=100_000, rpm=1_000)
    assert chat(env, tenant.key).status_code == 200

    env.redis.stop()
    statuses, slowest = [], 0.0
    for _ in range(10):
        started = time.monotonic()
        response = chat(env, tenant.key)
        slowest = max(slowest, time.monotonic() - started)
        statuses.append(response.status_code)
        if env.kind == "fail_closed":
            assert response.json()["error"]["code"] == "service_unavailable"
            assert response.headers["retry-after"] == "1"
    assert slowest < 1.0, "no request may hang on Redis"
    assert set(statuses) == ({503} if env.kind == "fail_closed" else {200})
    if env.kind == "fail_open":
        assert metric(env, "gateway_limiter_fail_open_total") >= 10
        # One line for the outage, not one per request, and without Redis' address.
        assert env.gateways[0].log().count("admitting without limits (fail-open)") == 1
    log = env.gateways[0].log()
    assert f":{env.redis.port}" not in log and f"', {env.redis.port})" not in log
    assert httpx.get(f"{env.gateways[0].url}/ready").status_code == (503 if env.kind == "fail_closed" else 200)

    env.redis.start()
    wait_for(
        lambda: httpx.get(f"{env.gateways[0].url}/ready").json()["redis"] == "up",
        timeout=5,
        what="the gateway to see Redis again",
    )
    recovered = chat(env, tenant.key)
    assert recovered.status_code == 200
    assert recovered.headers["x-ratelimit-limit-tokens"] == "100000"  # checked by Redis again


def test_budgets_are_rebuilt_from_the_ledger_after_redis_loses_its_data(
    outage_env: LimitsEnv, backend: MockBackend
) -> None:
    env = outage_env
    assert env.redis is not None
    tenant = make_tenant(env.database.engine)
    set_override(env.database.engine, "team", tenant.team, {"daily_tokens": 300})
    env.sync()
    used = 0
    while used < 200:
        response = chat(env, tenant.key, max_tokens=20)
        assert response.status_code == 200
        used += response.json()["usage"]["total_tokens"]
    wait_for(
        lambda: sum(r["prompt_tokens"] + r["completion_tokens"] for r in env.database.usage_rows()) == used,
        what="the ledger to hold the usage",
    )

    env.redis.stop()
    env.redis.start()  # a Redis without persistence: everything is gone
    wait_for(
        lambda: httpx.get(f"{env.gateways[0].url}/ready").json()["redis"] == "up",
        timeout=5,
        what="the gateway to see Redis again",
    )
    # 300 - used < 100: a request reserving ~110 tokens must be refused, as if nothing had been lost.
    response = chat(env, tenant.key, max_tokens=100)
    assert response.status_code == 429, response.text
    assert response.json()["error"]["code"] == "insufficient_quota"
    small = chat(env, tenant.key, max_tokens=5)
    assert small.status_code == 200 if used + 30 <= 300 else small.status_code == 429
