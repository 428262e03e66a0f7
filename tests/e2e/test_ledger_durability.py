"""The ledger loses nothing and counts nothing twice: database outages, SIGKILL, SIGTERM, under load.

"Answered" below means the client received the whole response (for streams: through `data: [DONE]`). Every
answered request must be in the ledger exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest

from tests.harness import (
    Database,
    Gateway,
    MockBackend,
    RedisServer,
    Tenant,
    descendants,
    gateway_config,
    make_tenant,
    start_gateway,
    wait_for,
)
from tests.tcp_proxy import TcpProxy, via_proxy

pytestmark = pytest.mark.slow

CHAT = [{"role": "user", "content": "Write one line about ledgers."}]
# Under this much load on a shared 2-core machine the mock can be slow to answer; no test here is about timeouts.
PATIENT = {"timeouts.first_byte": 15.0, "timeouts.idle": 15.0}


@dataclass
class Load:
    answered: set[str] = field(default_factory=set)
    failures: int = 0
    stop: asyncio.Event = field(default_factory=asyncio.Event)


async def drive(gateways: list[Gateway], key: str, load: Load, *, workers: int = 16) -> None:
    """Clients sending streaming and plain requests until `load.stop`; answered ids are recorded."""

    async def worker(index: int, session: aiohttp.ClientSession) -> None:
        stream = index % 2 == 0
        body = {"model": "mock-small", "messages": CHAT, "max_tokens": 8, "stream": stream}
        while not load.stop.is_set():
            live = [gateway for gateway in gateways if gateway.process.popen.poll() is None] or gateways
            gateway = live[index % len(live)]
            try:
                async with session.post(
                    f"{gateway.base_url}/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}
                ) as response:
                    payload = await response.read()
                    complete = payload.rstrip().endswith(b"data: [DONE]") if stream else payload.endswith(b"}")
                    if response.status == 200 and complete:
                        load.answered.add(response.headers["x-gateway-request-id"])
                    else:
                        load.failures += 1
            except (TimeoutError, aiohttp.ClientError):
                load.failures += 1
                await asyncio.sleep(0.01)  # the gateway is going away: don't spin

    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        await asyncio.gather(*(worker(index, session) for index in range(workers)))


def ledger_ids(database: Database, tenant: Tenant) -> list[str]:
    return [str(row["request_id"]) for row in database.usage_rows() if row["key_id"] == tenant.key_id]


def assert_exactly_once(database: Database, tenant: Tenant, load: Load, *, timeout: float = 60) -> None:
    assert load.answered, "the load never got an answer"
    wait_for(
        lambda: load.answered <= set(ledger_ids(database, tenant)),
        timeout=timeout,
        what="every answered request to reach the ledger",
    )
    ids = ledger_ids(database, tenant)
    assert len(ids) == len(set(ids)), "a request was recorded twice"
    assert load.answered <= set(ids)


@pytest.mark.parametrize("buffer", ["redis", "spool"])
def test_database_outage_under_load_loses_nothing(
    buffer: str, postgres: Database, mock_backend: MockBackend, tmp_path: Path
) -> None:
    outage = 30.0 if buffer == "redis" else 10.0
    proxy = TcpProxy("127.0.0.1", 5432)
    redis = RedisServer(tmp_path) if buffer == "redis" else None
    if redis:
        redis.start()
    overrides = {"redis.url": redis.url, **PATIENT} if redis else PATIENT
    gateway = start_gateway(tmp_path, gateway_config(via_proxy(postgres.url, proxy), mock_backend.url, **overrides))
    tenant = make_tenant(postgres.engine)
    try:
        wait_for(lambda: gateway_ready_with(gateway, tenant), timeout=5, what="the key")
        load = Load()

        async def scenario() -> None:
            driver = asyncio.create_task(drive([gateway], tenant.key, load))
            await wait_async(lambda: len(load.answered) >= 50)
            proxy.cut()
            cut_at = len(load.answered)
            await asyncio.sleep(outage)  # the outage itself: what is under test is what happens meanwhile
            assert len(load.answered) > cut_at + 100, "the gateway must keep serving while the database is down"
            ready = await get_json(f"{gateway.url}/ready")
            assert ready["database"] == "down"
            assert ready["usage_backlog"] > 0 or ready["usage_spool_bytes"] > 0
            proxy.restore()
            await wait_async(lambda: len(load.answered) >= cut_at + 200)
            load.stop.set()
            await driver

        asyncio.run(scenario())
        assert_exactly_once(postgres, tenant, load)
        assert load.failures == 0
    finally:
        gateway.stop()
        proxy.close()
        if redis:
            redis.stop()
    assert "Traceback" not in gateway.log()


def test_sigkill_under_load_loses_no_answered_request(
    postgres: Database, mock_backend: MockBackend, tmp_path: Path
) -> None:
    redis = RedisServer(tmp_path)
    redis.start()
    config = gateway_config(
        postgres.url, mock_backend.url, **{"redis.url": redis.url, "metering.claim_idle": 2.0}, **PATIENT
    )
    victim, survivor = start_gateway(tmp_path, config), start_gateway(tmp_path, config)
    tenant = make_tenant(postgres.engine)
    try:
        for gateway in (victim, survivor):
            wait_for(lambda gateway=gateway: gateway_ready_with(gateway, tenant), timeout=5, what="the key")
        load = Load()

        async def scenario() -> None:
            driver = asyncio.create_task(drive([victim, survivor], tenant.key, load))
            await wait_async(lambda: len(load.answered) >= 300)
            # The whole gateway at once, as in a machine crash: supervisor, worker and its ledger writer.
            for pid in [victim.process.popen.pid, *descendants(victim.process.popen.pid)]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            killed_at = len(load.answered)
            await wait_async(lambda: len(load.answered) >= killed_at + 200)
            load.stop.set()
            await driver

        asyncio.run(scenario())
        assert victim.process.popen.wait(5) == -signal.SIGKILL
        assert_exactly_once(postgres, tenant, load)
    finally:
        victim.stop()
        survivor.stop()
        redis.stop()


@pytest.mark.parametrize("buffer", ["redis", "spool"])
def test_sigterm_under_load_drains_before_exit(
    buffer: str, postgres: Database, mock_backend: MockBackend, tmp_path: Path
) -> None:
    redis = RedisServer(tmp_path) if buffer == "redis" else None
    if redis:
        redis.start()
    overrides = {"redis.url": redis.url, **PATIENT} if redis else PATIENT
    # A long flush interval: rows are still buffered when SIGTERM arrives, so only the drain can save them.
    gateway = start_gateway(
        tmp_path, gateway_config(postgres.url, mock_backend.url, **overrides, **{"metering.flush_interval": 30.0})
    )
    tenant = make_tenant(postgres.engine)
    try:
        wait_for(lambda: gateway_ready_with(gateway, tenant), timeout=5, what="the key")
        load = Load()

        async def scenario() -> None:
            driver = asyncio.create_task(drive([gateway], tenant.key, load))
            await wait_async(lambda: len(load.answered) >= 200)
            gateway.process.popen.send_signal(signal.SIGTERM)
            await asyncio.get_running_loop().run_in_executor(None, gateway.process.popen.wait, 30)
            load.stop.set()
            await driver

        asyncio.run(scenario())
        assert gateway.process.popen.returncode == 0
        # The process is gone: whatever is in the ledger now, it wrote before exiting.
        ids = ledger_ids(postgres, tenant)
        assert len(ids) == len(set(ids))
        assert load.answered <= set(ids), f"{len(load.answered - set(ids))} answered requests missing"
    finally:
        gateway.stop()
        if redis:
            redis.stop()


def gateway_ready_with(gateway: Gateway, tenant: Tenant) -> bool:
    import httpx

    response = httpx.get(f"{gateway.base_url}/models", headers={"Authorization": f"Bearer {tenant.key}"})
    return response.status_code == 200


async def wait_async(predicate: object, within: float = 60.0) -> None:
    deadline = time.monotonic() + within
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for the load to make progress")
        await asyncio.sleep(0.05)  # poll interval


async def get_json(url: str) -> dict[str, object]:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return await response.json()  # type: ignore[no-any-return]
