"""Limits through real gateway processes: never overshot under concurrency across replicas, OpenAI-style 429s.

Runs twice: with Redis (two gateway processes sharing a redis-server of the test's own) and with the in-process
limiter (one process). Windows are 2 s here (`limits.window_seconds`) so the tests see several of them.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import openai
import pytest

from gateway.limits.overrides import set_override
from tests.harness import (
    CHAT,
    WINDOW_S,
    LimitsEnv,
    MockBackend,
    RedisServer,
    Tenant,
    create_database,
    limits_config,
    make_tenant,
    metric_value,
    start_gateway,
    wait_for,
)


@pytest.fixture(scope="module", params=["redis", "local"])
def env(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, mock_backend: MockBackend
) -> Iterator[LimitsEnv]:
    tmp = Path(tmp_path_factory.mktemp(f"limits-{request.param}"))
    database = create_database("sqlite", tmp)
    redis = None
    if request.param == "redis":
        redis = RedisServer(tmp)
        redis.start()
    config = limits_config(database.url, mock_backend.url, redis.url if redis else None)
    gateways = [start_gateway(tmp, config) for _ in range(2 if redis else 1)]
    yield LimitsEnv(request.param, database, gateways, redis)
    for gateway in gateways:
        gateway.stop()
        assert "Traceback" not in gateway.log(), gateway.log()[-4000:]
    if redis:
        redis.stop()
    database.drop()


def usage_rows(env: LimitsEnv, tenant: Tenant) -> list[dict[str, Any]]:
    return [row for row in env.database.usage_rows() if row["key_id"] == tenant.key_id]


def windows_respect(rows: list[dict[str, Any]], limit: int, measure: Any) -> tuple[bool, int]:
    """For every window [s, s + W) starting at an admission, the admitted amount is within the limit."""
    times = sorted((row["started_at"].timestamp(), measure(row)) for row in rows)
    worst = 0
    for index, (start, _) in enumerate(times):
        total = sum(amount for moment, amount in times[index:] if moment < start + WINDOW_S)
        worst = max(worst, total)
    return worst <= limit, worst


async def hammer(
    env: LimitsEnv,
    key: str,
    *,
    seconds: float,
    workers: int,
    max_tokens: int | None,
    statuses: list[int],
    bad_429: list[str],
) -> None:
    """Clients on every gateway, streaming and not, honouring retry-after like the SDK does."""
    deadline = time.monotonic() + seconds

    async def worker(index: int, session: aiohttp.ClientSession) -> None:
        gateway = env.gateways[index % len(env.gateways)]
        stream = index % 2 == 0
        body: dict[str, Any] = {"model": "mock-small", "messages": CHAT, "stream": stream}
        if max_tokens is not None:
            body["max_tokens"] = max_tokens
        while time.monotonic() < deadline:
            async with session.post(
                f"{gateway.base_url}/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}
            ) as response:
                await response.read()
                statuses.append(response.status)
                if response.status == 429:
                    headers = response.headers
                    has_retry = headers.get("retry-after") and headers.get("retry-after-ms")
                    has_limits = headers.get("x-ratelimit-limit-tokens") or headers.get("x-ratelimit-limit-requests")
                    if not (has_retry and has_limits):
                        bad_429.append(str(dict(headers)))
                    # Client behaviour under test: wait as told, with jitter, then try again.
                    await asyncio.sleep(int(headers.get("retry-after-ms", "100")) / 1000 * random.uniform(0.5, 1.0))

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(worker(index, session) for index in range(workers)))


def test_tpm_never_overshot_under_concurrency(env: LimitsEnv, backend: MockBackend) -> None:
    limit = 1_500
    tenant = env.tenant(tpm=limit)
    statuses: list[int] = []
    bad_429: list[str] = []
    asyncio.run(
        hammer(env, tenant.key, seconds=3 * WINDOW_S, workers=60, max_tokens=20, statuses=statuses, bad_429=bad_429)
    )

    assert statuses.count(429) > 0 and statuses.count(200) > 0, statuses
    assert not bad_429, bad_429[:2]
    assert set(statuses) <= {200, 429}
    rows = wait_for(
        lambda: len(usage_rows(env, tenant)) == statuses.count(200) and usage_rows(env, tenant), what="all usage rows"
    )
    ok, worst = windows_respect(rows, limit, lambda row: row["prompt_tokens"] + row["completion_tokens"])
    assert ok, f"{worst} tokens admitted in one {WINDOW_S}s window, limit {limit}"
    assert all(row["usage_source"] == "backend" for row in rows)
    # The limiter really let traffic through near the limit, not far below it.
    assert worst > limit * 0.6, worst


def test_rpm_never_overshot_under_concurrency(env: LimitsEnv, backend: MockBackend) -> None:
    limit = 25
    tenant = env.tenant(rpm=limit)
    statuses: list[int] = []
    bad_429: list[str] = []
    asyncio.run(
        hammer(env, tenant.key, seconds=3 * WINDOW_S, workers=30, max_tokens=5, statuses=statuses, bad_429=bad_429)
    )
    assert statuses.count(429) > 0 and not bad_429
    rows = wait_for(
        lambda: len(usage_rows(env, tenant)) == statuses.count(200) and usage_rows(env, tenant), what="all usage rows"
    )
    ok, worst = windows_respect(rows, limit, lambda row: 1)
    assert ok, f"{worst} requests admitted in one window, limit {limit}"
    assert worst >= limit * 0.6


def test_concurrency_limit_is_exact(env: LimitsEnv, backend: MockBackend) -> None:
    tenant = env.tenant(concurrency=3)
    backend.set_faults({"mode": "slow", "ttft_ms": 1_000, "times": None})  # under the 1.5 s first-byte timeout

    async def burst() -> list[aiohttp.ClientResponse]:
        async with aiohttp.ClientSession() as session:

            async def one(index: int) -> tuple[int, dict[str, str], str]:
                gateway = env.gateways[index % len(env.gateways)]
                async with session.post(
                    f"{gateway.base_url}/chat/completions",
                    json={"model": "mock-small", "messages": CHAT, "max_tokens": 3},
                    headers={"Authorization": f"Bearer {tenant.key}"},
                ) as response:
                    return response.status, dict(response.headers), await response.text()

            return await asyncio.gather(*(one(index) for index in range(10)))  # type: ignore[return-value]

    results = asyncio.run(burst())
    statuses = sorted(status for status, _, _ in results)
    assert statuses == [200] * 3 + [429] * 7
    refused = [(headers, text) for status, headers, text in results if status == 429]
    assert all("concurrent" in text and headers["x-should-retry"] == "true" for headers, text in refused)
    # Slots are released at settlement: the next request gets in at once.
    backend.set_faults()
    response = httpx.post(
        f"{env.gateways[0].base_url}/chat/completions",
        headers={"Authorization": f"Bearer {tenant.key}"},
        json={"model": "mock-small", "messages": CHAT, "max_tokens": 3},
    )
    assert response.status_code == 200


def test_cost_budget_is_never_overshot_and_the_sdk_stops_at_once(env: LimitsEnv, backend: MockBackend) -> None:
    # 2.50 / 10.00 USD per 1M tokens on mock-large: a request of ~15 prompt + 10 completion tokens costs ~0.14 mUSD.
    budget_nanousd = 1_500_000
    tenant = env.tenant(monthly_cost_nanousd=budget_nanousd)
    client = openai.OpenAI(base_url=env.gateways[0].base_url, api_key=tenant.key)  # default retries on
    answered = 0
    with pytest.raises(openai.RateLimitError) as refused:
        for _ in range(200):
            client.chat.completions.create(model="mock-large", messages=CHAT, max_tokens=10)
            answered += 1
    error = refused.value.body
    assert refused.value.code == "insufficient_quota" and error["type"] == "insufficient_quota"
    assert refused.value.response.headers["x-should-retry"] == "false"
    assert "monthly spend budget" in refused.value.message
    rows = wait_for(lambda: len(usage_rows(env, tenant)) == answered and usage_rows(env, tenant), what="rows")
    assert sum(row["cost_nanousd"] for row in rows) <= budget_nanousd
    assert answered >= 5
    # The SDK did not retry: exactly one refusal was counted for this team's budget... and the next call too.
    before = rejected_budget_count(env)
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model="mock-large", messages=CHAT, max_tokens=10)
    assert rejected_budget_count(env) - before == 1


def rejected_budget_count(env: LimitsEnv) -> float:
    total = 0.0
    for gateway in env.gateways:
        for line in httpx.get(f"{gateway.url}/metrics").text.splitlines():
            if line.startswith('gateway_rate_limited_total{limit="monthly_cost",scope="team"}'):
                total += float(line.rsplit(" ", 1)[1])
    return total


def test_sdk_rides_out_a_short_rate_limit_wait(env: LimitsEnv, backend: MockBackend) -> None:
    tenant = env.tenant(rpm=2)
    client = openai.OpenAI(base_url=env.gateways[0].base_url, api_key=tenant.key, max_retries=3)
    started = time.monotonic()
    for _ in range(3):
        completion = client.chat.completions.create(model="mock-small", messages=CHAT, max_tokens=3)
        assert completion.choices[0].message.content
    # The third call was refused, waited as told by retry-after-ms, and went through without the caller noticing.
    assert time.monotonic() - started >= WINDOW_S * 0.5
    assert len(usage_rows(env, tenant)) <= 3


def test_settlement_refunds_and_charges_debt_visible_in_headers(env: LimitsEnv, backend: MockBackend) -> None:
    limit = 10_000
    tenant = env.tenant(tpm=limit)
    url = f"{env.gateways[0].base_url}/chat/completions"
    headers = {"Authorization": f"Bearer {tenant.key}"}
    body = {"model": "mock-small", "messages": CHAT, "max_tokens": 200}

    first = httpx.post(url, headers=headers, json=body)
    reserved = limit - int(first.headers["x-ratelimit-remaining-tokens"])
    used = first.json()["usage"]["total_tokens"]
    assert used < reserved  # max_tokens 200, the mock stops far earlier
    assert first.headers["x-ratelimit-limit-tokens"] == str(limit)
    assert first.headers["x-ratelimit-reset-tokens"].endswith("s")

    second = httpx.post(url, headers=headers, json=body)
    # The first request's unused reservation came back before the second was admitted.
    assert int(second.headers["x-ratelimit-remaining-tokens"]) == limit - used - reserved
    used += second.json()["usage"]["total_tokens"]

    # No max_tokens: 5 completion tokens reserved (limits.default_max_tokens); the reply is longer, so it's debt.
    third = httpx.post(url, headers=headers, json={"model": "mock-small", "messages": CHAT})
    third_used = third.json()["usage"]["total_tokens"]
    third_reserved = limit - used - int(third.headers["x-ratelimit-remaining-tokens"])
    assert third_used > third_reserved
    fourth = httpx.post(url, headers=headers, json=body)
    assert int(fourth.headers["x-ratelimit-remaining-tokens"]) == limit - used - third_used - reserved


def test_request_larger_than_the_limit_is_refused_without_retry(env: LimitsEnv, backend: MockBackend) -> None:
    tenant = env.tenant(tpm=100)
    response = httpx.post(
        f"{env.gateways[0].base_url}/chat/completions",
        headers={"Authorization": f"Bearer {tenant.key}"},
        json={"model": "mock-small", "messages": CHAT, "max_tokens": 500},
    )
    assert response.status_code == 429
    assert response.headers["x-should-retry"] == "false"
    assert response.json()["error"]["param"] == "max_tokens"


def test_every_response_carries_rate_limit_headers(env: LimitsEnv, backend: MockBackend) -> None:
    tenant = env.tenant(rpm=1000, tpm=100_000)
    client = openai.OpenAI(base_url=env.gateways[0].base_url, api_key=tenant.key, max_retries=0)
    raw = client.chat.completions.with_raw_response.create(model="mock-small", messages=CHAT, max_tokens=5)
    for name in ("limit", "remaining", "reset"):
        assert raw.headers[f"x-ratelimit-{name}-requests"]
        assert raw.headers[f"x-ratelimit-{name}-tokens"]
    assert raw.headers["x-ratelimit-remaining-requests"] == "999"
    streamed = client.chat.completions.with_raw_response.create(
        model="mock-small", messages=CHAT, max_tokens=5, stream=True
    )
    assert streamed.headers["x-ratelimit-remaining-requests"] == "998"
    list(streamed.parse())


def metric(env: LimitsEnv, sample: str) -> float:
    return metric_value(env.gateways[0], sample)


def test_a_busy_keys_grants_are_renewed_in_the_background_as_a_period_begins(
    env: LimitsEnv, backend: MockBackend
) -> None:
    if env.kind != "redis":
        pytest.skip("local grants save Redis round trips: the in-process limiter has none")
    # Concurrency and budget grants end with the 2 s period (window grants here end with their 100 ms bucket).
    tenant = env.tenant(concurrency=1_000, daily_tokens=10**9)
    in_worker = 'gateway_limit_admissions_total{where="worker"}'
    renewed = 'gateway_limit_grant_renewals_total{outcome="renewed"}'
    before, renewed_before = metric(env, in_worker), metric(env, renewed)

    def admitted_in_worker() -> bool:
        response = httpx.post(
            f"{env.gateways[0].base_url}/chat/completions",
            headers={"Authorization": f"Bearer {tenant.key}"},
            json={"model": "mock-small", "messages": CHAT, "max_tokens": 5},
        )
        assert response.status_code == 200
        return metric(env, in_worker) > before

    # Usually the third: the first asks Redis, the second reserves grants beside it (unless its period is about to
    # end), the third uses them.
    wait_for(admitted_in_worker, timeout=10, what="a request admitted from the worker's grants")
    # The key stays busy (a request per poll), so that every period's grants are used and due for renewal.
    wait_for(
        lambda: admitted_in_worker() and metric(env, renewed) > renewed_before,
        timeout=15,
        interval=0.1,
        what="the grants' renewal",
    )


def test_soft_budget_admits_and_flags(env: LimitsEnv, backend: MockBackend) -> None:
    tenant = env.tenant(daily_tokens=30, budget_mode="soft")
    url = f"{env.gateways[0].base_url}/chat/completions"
    flagged = []
    for _ in range(4):
        response = httpx.post(
            url,
            headers={"Authorization": f"Bearer {tenant.key}"},
            json={"model": "mock-small", "messages": CHAT, "max_tokens": 5},
        )
        assert response.status_code == 200
        flagged.append(response.headers.get("x-gateway-budget-exceeded"))
    assert flagged[0] is None and flagged[-1] == "team:daily_tokens"


def test_key_expiry_with_limits_still_401(env: LimitsEnv) -> None:
    tenant = make_tenant(env.database.engine, expires_in=timedelta(seconds=-1))
    env.sync()
    response = httpx.post(
        f"{env.gateways[0].base_url}/chat/completions",
        headers={"Authorization": f"Bearer {tenant.key}"},
        json={"model": "mock-small", "messages": CHAT},
    )
    assert response.status_code == 401


def test_organisation_wide_model_cap_is_shared_and_refusals_refund_the_team(
    env: LimitsEnv, backend: MockBackend
) -> None:
    first, second = env.tenant(rpm=5), env.tenant(rpm=5)
    set_override(env.database.engine, "model", "mock-large", {"rpm": 4})
    env.sync()

    def send(tenant: Tenant) -> httpx.Response:
        return httpx.post(
            f"{env.gateways[0].base_url}/chat/completions",
            headers={"Authorization": f"Bearer {tenant.key}"},
            json={"model": "mock-large", "messages": CHAT, "max_tokens": 3},
        )

    statuses = [send(tenant).status_code for tenant in (first, first, second, second)]
    assert statuses == [200] * 4
    refused = [send(first) for _ in range(3)]
    assert all(response.status_code == 429 for response in refused)
    assert "model 'mock-large'" in refused[0].json()["error"]["message"]

    # Without the cap, the first team has used 2 of its 5: the refused requests gave their team reservation back.
    set_override(env.database.engine, "model", "mock-large", {"rpm": None})
    env.sync()
    assert [send(first).status_code for _ in range(3)] == [200, 200, 200]
    assert send(first).status_code == 429
