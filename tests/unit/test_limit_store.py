"""The limit algorithm, run against real Redis (the Lua scripts) and the in-process store: same cases, same answers."""

from __future__ import annotations

import asyncio
import random
import secrets
import time
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from gateway.limits import redis_store
from gateway.limits.checks import Check, Periods, marker_key
from gateway.limits.redis_store import RedisStore
from gateway.limits.store import AdmitCall, AdmitResult, LimitStore, LocalStore, SettleCall
from gateway.redis_client import make_redis
from tests.harness import RedisServer, wait_for


@pytest.fixture(params=["redis", "local"])
async def store(request: pytest.FixtureRequest, redis_server: RedisServer) -> AsyncIterator[LimitStore]:
    if request.param == "local":
        yield LocalStore()
        return
    client = aioredis.from_url(redis_server.url)
    yield RedisStore(client)
    await client.aclose()


def slot() -> str:
    return f"t:{secrets.randbelow(10**9)}"


def window(key: str, limit: int, *, window_ms: int = 60_000, bucket_ms: int = 2_000, tokens: bool = True) -> Check:
    return Check("sw", key, limit, 0, window_ms, bucket_ms, tokens, None, "tokens" if tokens else "requests")


def with_amount(check: Check, amount: int) -> Check:
    return Check(check.kind, check.key, check.limit, amount, check.p1, check.p2, check.tokens, None, check.metric)


def now_periods() -> Periods:
    return Periods.at(int(time.time() * 1000))


async def admit(
    store: LimitStore,
    checks: list[Check],
    *,
    request_id: str = "r",
    clamp: int = 0,
    prompt: int = 0,
    periods: Periods | None = None,
) -> AdmitResult:
    call = AdmitCall(checks, request_id, periods or now_periods(), clamp, prompt)
    return (await store.admit([call]))[0]


async def settle(
    store: LimitStore, checks: list[Check], deltas: list[int], admitted_ms: int, request_id: str = "r"
) -> None:
    await store.settle([SettleCall(checks, deltas, request_id, admitted_ms)])


async def test_exactly_at_the_limit_then_refused(store: LimitStore) -> None:
    base = window(f"gw:v1:{{{slot()}}}:tk:2000:team", 100)
    assert (await admit(store, [with_amount(base, 60)])).code == AdmitResult.ADMITTED
    exact = await admit(store, [with_amount(base, 40)])
    assert exact.code == AdmitResult.ADMITTED and exact.values == [100]
    refused = await admit(store, [with_amount(base, 1)])
    assert refused.code == AdmitResult.REFUSED and refused.failed == 0
    assert 58_000 <= refused.retry_ms <= 62_000  # the whole reservation frees once it leaves the window


async def test_all_or_nothing_across_checks(store: LimitStore) -> None:
    tag = slot()
    team = window(f"gw:v1:{{{tag}}}:tk:2000:team", 100)
    key = window(f"gw:v1:{{{tag}}}:tk:2000:key:a", 50)
    assert (await admit(store, [with_amount(team, 40), with_amount(key, 40)])).code == AdmitResult.ADMITTED
    refused = await admit(store, [with_amount(team, 20), with_amount(key, 20)])
    assert refused.code == AdmitResult.REFUSED and refused.failed == 1
    # The team check consumed nothing for the refused request.
    result = await admit(store, [with_amount(team, 60)])
    assert result.code == AdmitResult.ADMITTED and result.values == [100]


async def test_refund_and_debt(store: LimitStore) -> None:
    base = window(f"gw:v1:{{{slot()}}}:tk:2000:team", 100)
    first = await admit(store, [with_amount(base, 80)])
    await settle(store, [with_amount(base, 80)], [-50], first.now_ms)  # used 30 of 80
    second = await admit(store, [with_amount(base, 60)])
    assert second.code == AdmitResult.ADMITTED and second.values == [90]
    await settle(store, [with_amount(base, 60)], [+40], second.now_ms)  # used 100 of 60: 40 of debt
    assert (await admit(store, [with_amount(base, 1)])).code == AdmitResult.REFUSED
    # A refund never takes back more than the bucket holds (it could belong to other requests).
    await settle(store, [with_amount(base, 60)], [-10_000], second.now_ms)
    result = await admit(store, [with_amount(base, 100)])
    assert result.code == AdmitResult.ADMITTED and result.values == [100]


async def test_window_sum_always_matches_its_buckets(redis_server: RedisServer) -> None:
    """The scripts write a bucket and the window's sum in one HSET from values they read: after any mix of
    reservations, refunds and debts (to live and to expired buckets), across bucket boundaries, the sum is still
    the sum of the buckets and no bucket is negative."""
    client = aioredis.from_url(redis_server.url)
    store = RedisStore(client)
    rng = random.Random(20261201)
    key = f"gw:v1:{{{slot()}}}:tk:20:team"
    base = window(key, 10**9, window_ms=100, bucket_ms=20)
    admitted: list[tuple[int, int]] = []
    started = time.monotonic()
    steps = 0
    while steps < 300 or time.monotonic() - started < 0.6:  # many buckets come and go meanwhile
        steps += 1
        amount = rng.randint(1, 50)
        result = await admit(store, [with_amount(base, amount)])
        assert result.code == AdmitResult.ADMITTED
        admitted.append((result.now_ms, amount))
        if rng.random() < 0.6:
            when, reserved = admitted[rng.randrange(max(0, len(admitted) - 40), len(admitted))]
            await settle(store, [with_amount(base, reserved)], [rng.randint(-reserved, 40)], when)
        fields = await client.hgetall(key)
        buckets = [int(value) for field, value in fields.items() if field not in (b"s", b"o")]
        assert int(fields[b"s"]) == sum(buckets), (steps, fields)
        assert min(buckets) >= 0
    await client.aclose()


async def test_sliding_window_never_frees_before_a_whole_window(store: LimitStore) -> None:
    """A fixed window would let the full limit through again at its boundary; this never does within W."""
    window_ms = 600
    base = window(f"gw:v1:{{{slot()}}}:tk:60:team", 100, window_ms=window_ms, bucket_ms=60)
    first = await admit(store, [with_amount(base, 100)])
    assert first.code == AdmitResult.ADMITTED
    refused = await admit(store, [with_amount(base, 100)])
    assert refused.code == AdmitResult.REFUSED
    promised = refused.now_ms + refused.retry_ms

    deadline = time.time() + 3
    while (result := await admit(store, [with_amount(base, 100)])).code != AdmitResult.ADMITTED:
        assert time.time() < deadline
        await asyncio.sleep(0.005)  # poll interval
    assert result.now_ms - first.now_ms >= window_ms
    assert result.now_ms >= promised - 1


async def test_idle_window_resets(store: LimitStore) -> None:
    base = window(f"gw:v1:{{{slot()}}}:tk:20:team", 10, window_ms=100, bucket_ms=20)
    first = await admit(store, [with_amount(base, 10)])
    wait_for(lambda: time.time() * 1000 > first.now_ms + 400, what="several windows to pass")
    result = await admit(store, [with_amount(base, 10)])
    assert result.code == AdmitResult.ADMITTED and result.values == [10]


async def test_concurrency_leases_release_and_expire(store: LimitStore) -> None:
    check = Check("cc", f"gw:v1:{{{slot()}}}:cc:team", 2, 1, 300, 0, False, None, "concurrency")
    a = await admit(store, [check], request_id="a")
    assert a.code == AdmitResult.ADMITTED
    assert (await admit(store, [check], request_id="b")).values == [2]
    assert (await admit(store, [check], request_id="c")).code == AdmitResult.REFUSED
    await settle(store, [check], [0], a.now_ms, request_id="a")
    assert (await admit(store, [check], request_id="c")).code == AdmitResult.ADMITTED
    # b and c are never released: their leases expire, so a crashed gateway cannot leak slots.
    deadline = time.time() + 3
    while (await admit(store, [check], request_id="d")).code != AdmitResult.ADMITTED:
        assert time.time() < deadline
        await asyncio.sleep(0.005)  # poll interval


async def test_lease_renewal_keeps_a_slot(store: LimitStore) -> None:
    check = Check("cc", f"gw:v1:{{{slot()}}}:cc:team", 1, 1, 200, 0, False, None, "concurrency")
    held = await admit(store, [check], request_id="long")
    await store.renew([(check.key, "long", held.now_ms + 60_000)])
    wait_for(lambda: time.time() * 1000 > held.now_ms + 400, what="the original lease to run out")
    assert (await admit(store, [check], request_id="other")).code == AdmitResult.REFUSED


def budget(key: str, limit: int, amount: int, *, hard: bool = True, kind: str = "bd") -> Check:
    return Check(kind, key, limit, amount, 3600, 1 if hard else 0, True, None, "daily_tokens")


async def test_hard_and_soft_budgets(store: LimitStore) -> None:
    tag = slot()
    hard = budget(f"gw:v1:{{{tag}}}:bt:team:d1", 100, 60)
    assert (await admit(store, [hard])).code == AdmitResult.ADMITTED
    refused = await admit(store, [hard])
    assert refused.code == AdmitResult.REFUSED and refused.retry_ms == -1
    soft = budget(f"gw:v1:{{{tag}}}:bt:user:1:d1", 100, 60, hard=False)
    await admit(store, [soft])
    over = await admit(store, [soft])
    assert over.code == AdmitResult.ADMITTED and over.values == [120]


async def test_budget_period_mismatch_is_reported(store: LimitStore) -> None:
    yesterday = Periods.at(int(time.time() * 1000) - 86_400_000)
    check = budget(f"gw:v1:{{{slot()}}}:bt:team:d0", 100, 1)
    result = await admit(store, [check], periods=yesterday)
    assert result.code == AdmitResult.PERIOD_MISMATCH
    assert abs(result.now_ms - time.time() * 1000) < 5_000


async def test_marker_asks_for_a_rebuild_once(store: LimitStore) -> None:
    tag = slot()
    marker = Check("mk", marker_key(tag), 0, 0, 0, 0, False, None, "marker")
    counter = budget(f"gw:v1:{{{tag}}}:bt:team:d1", 100, 30)
    assert (await admit(store, [marker, counter])).code == AdmitResult.NEEDS_REBUILD
    assert await store.rebuild(marker_key(tag), [(counter.key, 80, 3600)]) is True
    assert await store.rebuild(marker_key(tag), [(counter.key, 80, 3600)]) is False
    result = await admit(store, [marker, counter])
    assert result.code == AdmitResult.REFUSED and result.failed == 1  # 80 + 30 > 100: usage kept, not reset


async def test_clamping_lowers_the_reservation_to_fit(store: LimitStore) -> None:
    base = window(f"gw:v1:{{{slot()}}}:tk:2000:team", 100)
    await admit(store, [with_amount(base, 30)])
    result = await admit(store, [with_amount(base, 10 + 200)], clamp=200, prompt=10)
    assert result.code == AdmitResult.ADMITTED
    assert result.granted == 60 and result.values == [100]
    assert (await admit(store, [with_amount(base, 12)], clamp=2, prompt=10)).code == AdmitResult.REFUSED


async def test_a_redis_that_never_answers_fails_the_call_within_its_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing per request arms a timer: the shared pipeline's timeout must end every wait on a silent Redis, as an
    error the limiter and the usage buffer handle (fail-open/closed, spool), never a hang."""
    accepted: list[asyncio.StreamWriter] = []

    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)
        while await reader.read(65536):
            pass

    server = await asyncio.start_server(swallow, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    url = f"redis://127.0.0.1:{port}/0"
    client = make_redis(url, timeout=0.2)
    store = RedisStore(client, url=url, timeout=0.2)
    monkeypatch.setattr(redis_store.ADMIT, "sha", "0" * 40)  # skip SCRIPT LOAD: straight to the pipeline
    check = with_amount(window(slot() + ":w", 100), 1)
    try:
        for call in (
            store.admit([AdmitCall([check], "r1", now_periods(), 0, 0)]),
            store.settle_and_append([], "usage-test", b"record"),
        ):
            with pytest.raises(RedisError):
                await asyncio.wait_for(call, timeout=10)  # a hang detector only: the store's own timeout is 0.2 s
        assert accepted, "the calls reached the silent server"
    finally:
        store.pipeliner.close()
        await client.aclose()
        server.close()
        for writer in accepted:
            writer.close()
        await server.wait_closed()
