"""Routing through real gateway processes to several mock vLLM workers: load-aware choice, failures and retries,
breakers, fallbacks, a provider's 429, draining, config reload, and fairness under saturation.

Tests wait on the deployment state the gateway exposes (`GET /admin/deployments`), never on sleeps.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import openai
import pytest
import yaml

from tests.harness import (
    Database,
    Gateway,
    MockBackend,
    Tenant,
    closed_port,
    create_database,
    gateway_config,
    make_tenant,
    start_gateway,
    start_mock_backend,
    wait_for,
)

ADMIN_KEY = "routing-test-admin-key-0123456789abcdef"
CHAT = [{"role": "user", "content": "route me"}]


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[list[MockBackend]]:
    backends = [start_mock_backend(tmp_path, "--models", "pool,mock-small") for _ in range(3)]
    yield backends
    for backend in backends:
        backend.close()


@pytest.fixture
def database(tmp_path: Path) -> Iterator[Database]:
    db = create_database("sqlite", tmp_path)
    yield db
    db.drop()


def routing_config(database: Database, workers: list[MockBackend], **models: Any) -> dict[str, Any]:
    config = gateway_config(database.url, workers[0].url)
    config["admin"] = {"keys": [ADMIN_KEY]}
    config["routing"] = {
        "scrape_interval": 0.1,
        "health_interval": 0.2,
        "breaker_threshold": 2,
        "breaker_cooldown": 1.0,
    }
    config["timeouts"] = {"connect": 1, "first_byte": 3, "idle": 3}
    config["models"]["pool"] = {
        "price": {"prompt": 1, "completion": 2},
        "deployments": [{"name": "pool", "kind": "vllm", "base_urls": [f"{w.url}/v1" for w in workers]}],
    }
    config["models"].update(models)
    return config


def deployments(gateway: Gateway) -> dict[str, dict[str, Any]]:
    response = httpx.get(f"{gateway.url}/admin/deployments", headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    response.raise_for_status()
    return {item["name"]: item for item in response.json()["data"]}


def endpoint_state(gateway: Gateway, deployment: str, worker: MockBackend) -> dict[str, Any]:
    return next(e for e in deployments(gateway)[deployment]["endpoints"] if e["base_url"] == f"{worker.url}/v1")


def chat(gateway: Gateway, key: str, model: str = "pool", **extra: Any) -> httpx.Response:
    return httpx.post(
        f"{gateway.base_url}/chat/completions",
        headers={"Authorization": f"Bearer {key}"},
        json={"model": model, "messages": CHAT, "max_tokens": 4, **extra},
        timeout=15,
    )


def served(worker: MockBackend) -> int:
    return int(worker.stats()["completed"])


@pytest.fixture
def setup(tmp_path: Path, database: Database, workers: list[MockBackend]) -> Iterator[tuple[Gateway, Tenant]]:
    gateway = start_gateway(tmp_path, routing_config(database, workers))
    tenant = make_tenant(database.engine)
    wait_for(lambda: chat(gateway, tenant.key).status_code == 200, timeout=5, what="the gateway")
    yield gateway, tenant
    gateway.stop()
    assert "Traceback" not in gateway.log()


def test_new_work_goes_to_the_least_loaded_worker(setup: tuple[Gateway, Tenant], workers: list[MockBackend]) -> None:
    gateway, tenant = setup
    busy, queued, idle = workers
    busy.client.post("/mock/load", json={"running": 8, "waiting": 30, "kv_cache_usage_perc": 0.95})
    queued.client.post("/mock/load", json={"running": 2, "waiting": 12})
    wait_for(
        lambda: (
            endpoint_state(gateway, "pool", busy)["waiting"] == 30
            and endpoint_state(gateway, "pool", queued)["waiting"] == 12
        ),
        what="the scraper to see the loads",
    )
    for worker in workers:
        worker.client.delete("/mock/requests")
    for _ in range(8):
        assert chat(gateway, tenant.key).status_code == 200
    assert (served(busy), served(queued), served(idle)) == (0, 0, 8)

    # The loads change: routing follows.
    idle.client.post("/mock/load", json={"running": 8, "waiting": 40})
    queued.client.post("/mock/load", json={"running": 0, "waiting": 0})
    wait_for(
        lambda: (
            endpoint_state(gateway, "pool", idle)["waiting"] == 40
            and endpoint_state(gateway, "pool", queued)["waiting"] == 0
        ),
        what="the new loads",
    )
    for _ in range(4):
        assert chat(gateway, tenant.key).status_code == 200
    assert served(queued) == 4


def test_a_worker_killed_under_load(setup: tuple[Gateway, Tenant], workers: list[MockBackend]) -> None:
    gateway, tenant = setup
    victim = workers[0]
    for worker in workers:
        worker.client.post("/mock/faults", json={"faults": [{"mode": "slow", "tokens_per_second": 40}]})

    async def scenario() -> tuple[list[int], list[str]]:
        statuses: list[int] = []
        stream_endings: list[str] = []
        stop = asyncio.Event()
        headers = {"Authorization": f"Bearer {tenant.key}"}

        async def plain(session: aiohttp.ClientSession) -> None:
            while not stop.is_set():
                body = {"model": "pool", "messages": CHAT, "max_tokens": 2}
                async with session.post(f"{gateway.base_url}/chat/completions", json=body, headers=headers) as r:
                    await r.read()
                    statuses.append(r.status)

        async def streaming(session: aiohttp.ClientSession) -> None:
            body = {"model": "pool", "messages": CHAT, "max_tokens": 200, "stream": True}
            async with session.post(f"{gateway.base_url}/chat/completions", json=body, headers=headers) as r:
                text = (await r.read()).decode()
                events = [event for event in text.split("\n\n") if event]
                stream_endings.append("error" if '"error"' in events[-2] else "ok")
                assert events[-1] == "data: [DONE]"

        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
            streams = [asyncio.create_task(streaming(session)) for _ in range(6)]
            plains = [asyncio.create_task(plain(session)) for _ in range(6)]
            await asyncio.sleep(0.5)  # let streams start on every worker: what is under test is the kill itself
            victim.process.popen.send_signal(signal.SIGKILL)
            await asyncio.gather(*streams)
            await asyncio.sleep(1.0)  # keep the plain load running while the gateway notices
            stop.set()
            await asyncio.gather(*plains)
        return statuses, stream_endings

    statuses, stream_endings = asyncio.run(scenario())
    assert statuses and set(statuses) == {200}, "plain requests are retried on another worker: no client error"
    assert "error" in stream_endings, "streams running on the killed worker end with an error event"
    assert "ok" in stream_endings
    wait_for(lambda: not endpoint_state(gateway, "pool", victim)["healthy"], what="the health check to notice")


def test_breaker_opens_then_recovers(tmp_path: Path, database: Database, workers: list[MockBackend]) -> None:
    flaky = workers[0]
    config = routing_config(database, workers[:2])
    config["routing"]["health_interval"] = 60  # passive failures only
    # Longer than the 15 requests below take on a busy machine: no half-open probe may come in between.
    config["routing"]["breaker_cooldown"] = 4.0
    gateway = start_gateway(tmp_path, config)
    tenant = make_tenant(database.engine)
    try:
        wait_for(lambda: chat(gateway, tenant.key).status_code == 200, timeout=5, what="the gateway")
        flaky.set_faults({"mode": "error", "status": 500, "times": None})
        statuses = [chat(gateway, tenant.key).status_code for _ in range(10)]
        assert set(statuses) == {200}  # each 500 was retried on the steady worker
        assert endpoint_state(gateway, "pool", flaky)["breaker"] == "open"
        errors_seen = flaky.stats()["errors"]
        assert [chat(gateway, tenant.key).status_code for _ in range(5)] == [200] * 5
        assert flaky.stats()["errors"] == errors_seen, "an open breaker sends nothing to the worker"

        flaky.set_faults()
        # After the cooldown one probe goes through; it succeeds, and the breaker closes.
        wait_for(
            lambda: (
                chat(gateway, tenant.key).status_code == 200
                and endpoint_state(gateway, "pool", flaky)["breaker"] == "closed"
            ),
            timeout=15,
            what="recovery",
        )
        before = served(flaky)
        for _ in range(6):
            chat(gateway, tenant.key)
        assert served(flaky) > before
    finally:
        gateway.stop()


def test_fallback_to_a_second_model_only_when_the_key_may_use_it(
    tmp_path: Path, database: Database, workers: list[MockBackend]
) -> None:
    config = routing_config(
        database,
        workers,
        primary={
            "price": {"prompt": 5, "completion": 5},
            "fallbacks": ["mock-small"],
            "deployments": [
                {"name": "primary-dead", "kind": "openai", "base_url": f"http://127.0.0.1:{closed_port()}/v1"}
            ],
        },
    )
    gateway = start_gateway(tmp_path, config)
    both = make_tenant(database.engine, models=["primary", "mock-small"])
    only_primary = make_tenant(database.engine, models=["primary"])
    try:
        wait_for(lambda: chat(gateway, both.key, "mock-small").status_code == 200, timeout=5, what="the gateway")
        response = chat(gateway, both.key, "primary")
        assert response.status_code == 200
        assert response.json()["model"] == "mock-small"
        refused = chat(gateway, only_primary.key, "primary")
        assert refused.status_code == 502
        rows = wait_for(
            lambda: [r for r in database.usage_rows() if r["key_id"] == both.key_id and r["model"] == "primary"],
            what="the ledger row",
        )
        # Charged against the requested model; priced at the deployment that served (mock-small's price).
        assert rows[0]["deployment"] == "mock-a" and rows[0]["status_code"] == 200
        expected = rows[0]["prompt_tokens"] * 150 + rows[0]["completion_tokens"] * 600
        assert rows[0]["cost_nanousd"] == expected
    finally:
        gateway.stop()


def test_provider_429_is_retried_elsewhere_and_its_retry_after_honoured(
    tmp_path: Path, database: Database, workers: list[MockBackend]
) -> None:
    first, second = workers[0], workers[1]
    config = routing_config(
        database,
        workers,
        provider={
            "price": {"prompt": 1, "completion": 1},
            "deployments": [
                {"name": "provider-1", "kind": "openai", "base_url": f"{first.url}/v1", "served_model": "mock-small"},
                {"name": "provider-2", "kind": "openai", "base_url": f"{second.url}/v1", "served_model": "mock-small"},
            ],
        },
    )
    gateway = start_gateway(tmp_path, config)
    tenant = make_tenant(database.engine)
    try:
        wait_for(lambda: chat(gateway, tenant.key).status_code == 200, timeout=5, what="the gateway")
        for worker in (first, second):
            worker.client.delete("/mock/requests")
        first.set_faults({"mode": "error", "status": 429, "headers": {"retry-after": "30"}, "times": None})
        # Whenever the first provider is tried it answers 429: the gateway retries on the other...
        statuses = [chat(gateway, tenant.key, "provider").status_code for _ in range(6)]
        assert statuses == [200] * 6
        # ...and sends nothing more to the one that asked for 30 s of quiet.
        assert first.stats()["requests"] == 1
        cooling = endpoint_state(gateway, "provider-1", first)
        assert cooling["breaker"] == "closed"  # overloaded is not broken
    finally:
        gateway.stop()


def test_drain_lets_streams_finish_and_takes_no_new_work(
    setup: tuple[Gateway, Tenant], workers: list[MockBackend]
) -> None:
    gateway, tenant = setup
    target = workers[0]
    for worker in workers[1:]:
        worker.client.post("/mock/load", json={"waiting": 50})  # make the target the obvious choice
    wait_for(lambda: endpoint_state(gateway, "pool", workers[1])["waiting"] == 50, what="the loads")
    target.set_faults({"mode": "slow", "tokens_per_second": 20, "times": 1})
    client = openai.OpenAI(base_url=gateway.base_url, api_key=tenant.key, max_retries=0)
    stream = client.chat.completions.create(model="pool", messages=CHAT, stream=True, max_tokens=30)
    first_chunk = next(iter(stream))
    assert first_chunk.choices
    assert target.stats()["running"] == 1

    drained = httpx.post(
        f"{gateway.url}/admin/deployments/pool/drain",
        headers={"Authorization": f"Bearer {ADMIN_KEY}"},
        json={"endpoint": f"{target.url}/v1"},
    )
    assert drained.status_code == 200
    wait_for(lambda: endpoint_state(gateway, "pool", target)["drained"], timeout=3, what="the drain to apply")
    before = target.stats()["requests"]
    for _ in range(5):
        assert chat(gateway, tenant.key).status_code == 200
    assert target.stats()["requests"] == before
    # The stream that was running there finishes normally.
    rest = list(stream)
    assert rest[-1].choices[0].finish_reason in ("length", "stop")
    httpx.post(
        f"{gateway.url}/admin/deployments/pool/undrain",
        headers={"Authorization": f"Bearer {ADMIN_KEY}"},
        json={"endpoint": f"{target.url}/v1"},
    ).raise_for_status()
    wait_for(lambda: not endpoint_state(gateway, "pool", target)["drained"], timeout=3, what="the undrain")


def test_config_reload_on_sighup_keeps_streams(setup: tuple[Gateway, Tenant], workers: list[MockBackend]) -> None:
    gateway, tenant = setup
    workers[0].set_faults({"mode": "slow", "tokens_per_second": 20, "times": None})
    workers[1].set_faults({"mode": "slow", "tokens_per_second": 20, "times": None})
    workers[2].set_faults({"mode": "slow", "tokens_per_second": 20, "times": None})
    client = openai.OpenAI(base_url=gateway.base_url, api_key=tenant.key, max_retries=0)
    stream = client.chat.completions.create(model="pool", messages=CHAT, stream=True, max_tokens=25)
    next(iter(stream))

    config = yaml.safe_load(gateway.config_path.read_text())
    config["models"]["added"] = {
        "price": {"prompt": 1, "completion": 1},
        "deployments": [{"name": "added", "base_url": f"{workers[2].url}/v1", "served_model": "mock-small"}],
    }
    config["aliases"] = {"pool-alias": "pool"}
    gateway.config_path.write_text(yaml.safe_dump(config))
    gateway.process.popen.send_signal(signal.SIGHUP)
    wait_for(
        lambda: {"added", "pool-alias"} <= {m.id for m in client.models.list()}, timeout=5, what="the reloaded models"
    )
    assert len(list(stream)) > 5  # the stream running during the reload went on to its end
    for worker in workers:
        worker.set_faults()
    assert chat(gateway, tenant.key, "added").json()["model"] == "added"
    assert chat(gateway, tenant.key, "pool-alias").status_code == 200

    gateway.config_path.write_text("models: [broken")
    gateway.process.popen.send_signal(signal.SIGHUP)
    wait_for(lambda: "configuration not reloaded" in gateway.log(), timeout=5, what="the refusal in the log")
    assert chat(gateway, tenant.key, "added").status_code == 200  # a bad file changes nothing


def test_a_flooding_team_does_not_starve_another(
    tmp_path: Path, database: Database, workers: list[MockBackend]
) -> None:
    """One slot, a team queueing 20 requests, then another team's single request: it is served within two
    queue positions (positions, not milliseconds, so this holds on a noisy machine)."""
    worker = workers[0]
    config = routing_config(
        database,
        workers,
        narrow={
            "price": {"prompt": 1, "completion": 1},
            "queue": {"max_waiting": 100, "timeout": 30},
            "deployments": [
                {"name": "narrow", "base_url": f"{worker.url}/v1", "served_model": "mock-small", "max_concurrency": 1}
            ],
        },
    )
    gateway = start_gateway(tmp_path, config)
    flood, quiet = make_tenant(database.engine), make_tenant(database.engine)
    try:
        wait_for(lambda: chat(gateway, quiet.key, "narrow").status_code == 200, timeout=5, what="the gateway")
        worker.client.delete("/mock/requests")
        worker.set_faults({"mode": "slow", "ttft_ms": 100, "times": None})

        async def scenario() -> None:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:

                async def send(tenant: Tenant, label: str) -> int:
                    body = {"model": "narrow", "messages": CHAT, "max_tokens": 2, "user": label}
                    async with session.post(
                        f"{gateway.base_url}/chat/completions",
                        json=body,
                        headers={"Authorization": f"Bearer {tenant.key}"},
                    ) as response:
                        await response.read()
                        return response.status

                floods = [asyncio.create_task(send(flood, f"flood-{i}")) for i in range(20)]
                await asyncio.to_thread(
                    wait_for, lambda: deployments(gateway)["narrow"]["queue_depth"] >= 15, what="the flood to queue"
                )
                dispatched_before.append(len([r for r in worker.requests() if r["body"]]))
                statuses = await asyncio.gather(send(quiet, "quiet"), *floods)
                assert set(statuses) == {200}

        dispatched_before: list[int] = []
        asyncio.run(scenario())
        order = [request["body"]["user"] for request in worker.requests() if request["body"]]
        assert len(order) == 21
        # FIFO would put the quiet team's request behind the ~15 queued flood requests; round robin across
        # teams serves it after at most one more of them (two allowing for one dispatched meanwhile).
        assert order.index("quiet") - dispatched_before[0] <= 2, order
    finally:
        gateway.stop()
