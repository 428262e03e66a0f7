"""Local grants (gateway/limits/grants.py) over a real Redis: requests admitted in the worker never let the workers
together pass a limit, every request's real usage ends up in Redis once its grants go back, and limits too tight to
share are still enforced request by request."""

from __future__ import annotations

import asyncio
import random
import time
from decimal import Decimal

import pytest

from gateway.auth.store import KeyRecord
from gateway.context import RequestContext
from gateway.errors import RateLimited
from gateway.limits.checks import Periods
from gateway.limits.grants import GRANT_MS, RENEW_DELAY, SEEN_SECONDS
from gateway.limits.limiter import MAX_RENEWALS_PER_TRIP, RENEWALS_PER_TRIP, QuotaLimiter, renewals_per_trip
from gateway.limits.redis_store import RedisStore
from gateway.settings import Limits, LimitValues
from tests.harness import key_record
from tests.limiters import Clock, Workers, admit, finish, new_team


async def evalsha_calls(limiter: QuotaLimiter) -> int:
    assert isinstance(limiter.store, RedisStore)
    stats = await limiter.store.client.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


async def window_sum(limiter: QuotaLimiter, team: KeyRecord, what: str, bucket_ms: int = 2_000) -> int:
    assert isinstance(limiter.store, RedisStore)
    key = f"gw:v1:{{t:{team.team_id}}}:{what}:{bucket_ms}:team"
    return int(await limiter.store.client.hget(key, "s") or 0)


async def budget(limiter: QuotaLimiter, team: KeyRecord, what: str, period: str) -> int:
    assert isinstance(limiter.store, RedisStore)
    return int(await limiter.store.client.get(f"gw:v1:{{t:{team.team_id}}}:{what}:team:{period}") or 0)


async def test_most_requests_are_admitted_in_the_worker_and_redis_counts_exactly_what_was_used(
    workers: Workers,
) -> None:
    limits = Limits(
        team=LimitValues(rpm=10**6, tpm=10**9, concurrency=10**4, daily_tokens=10**12, monthly_cost_usd=Decimal(10**6))
    )
    limiter = workers.add(limits)
    team = new_team()
    before = await evalsha_calls(limiter)
    used_tokens = used_cost = 0
    local = 0
    for _ in range(200):
        ctx = await admit(limiter, team)
        local += ctx.reservation.taken is not None and not ctx.reservation.calls
        # Shorter and longer replies than reserved (max_tokens 20): refunds and debts both settle into grants.
        tokens, cost = await finish(limiter, ctx, random.choice([0, 5, 20, 35]))
        used_tokens += tokens
        used_cost += cost
    assert local >= 150  # the first requests ask Redis; grants then double until the rest need no round trip
    assert await evalsha_calls(limiter) - before <= 60

    await limiter.close()  # every grant goes back
    periods = Periods.at(int(time.time() * 1000))
    assert await window_sum(limiter, team, "rq") == 200
    assert await window_sum(limiter, team, "tk") == used_tokens
    assert await budget(limiter, team, "bt", periods.day_id) == used_tokens
    assert await budget(limiter, team, "bc", periods.month_id) == used_cost
    assert isinstance(limiter.store, RedisStore)
    assert await limiter.store.client.zcard(f"gw:v1:{{t:{team.team_id}}}:cc:team") == 0


async def test_workers_together_never_pass_the_limit_and_refusals_leave_no_room_unused(workers: Workers) -> None:
    limit = 1_000
    limits = Limits(team=LimitValues(rpm=limit))
    team = new_team()
    limiters = [workers.add(limits) for _ in range(3)]
    admitted = [0, 0, 0]

    async def worker(index: int) -> None:
        refusals = 0
        while refusals < 3:  # a refused worker gives its grant back and asks again: three in a row mean "full"
            try:
                await admit(limiters[index], team)
            except RateLimited:
                refusals += 1
            else:
                refusals = 0
                admitted[index] += 1

    await asyncio.gather(*(worker(index) for index in range(3)))
    assert sum(admitted) == limit
    assert all(admitted)  # every worker had a share
    for limiter in limiters:
        await limiter.close()
    assert await window_sum(limiters[0], team, "rq") == limit


async def test_concurrency_slots_granted_to_a_worker_are_released(workers: Workers) -> None:
    limit = 64
    limiter = workers.add(Limits(team=LimitValues(concurrency=limit)))
    team = new_team()
    held = [await admit(limiter, team) for _ in range(limit)]
    assert any(ctx.reservation.taken and not ctx.reservation.calls for ctx in held)  # some took a granted slot
    with pytest.raises(RateLimited):
        await admit(limiter, team)
    for ctx in held:
        await finish(limiter, ctx, 1)
    await limiter.close()
    assert isinstance(limiter.store, RedisStore)
    assert await limiter.store.client.zcard(f"gw:v1:{{t:{team.team_id}}}:cc:team") == 0
    # All of the limit is free again, for a worker without grants too.
    exact = workers.add(Limits(team=LimitValues(concurrency=limit)), grants=False)
    assert len([await admit(exact, team) for _ in range(limit)]) == limit


async def test_tight_limits_are_never_granted(workers: Workers) -> None:
    limiter = workers.add(Limits(team=LimitValues(rpm=20)))
    team = new_team()
    before = await evalsha_calls(limiter)
    for _ in range(20):
        ctx = await admit(limiter, team)
        assert not ctx.reservation.taken or all(grant is None for grant, _, _ in ctx.reservation.taken)
    assert await evalsha_calls(limiter) - before == 20
    with pytest.raises(RateLimited):
        await admit(limiter, team)


async def test_headers_count_every_request_whether_admitted_locally_or_in_redis(workers: Workers) -> None:
    limiter = workers.add(Limits(team=LimitValues(rpm=10_000)))
    team = new_team()
    remaining = []
    for _ in range(40):
        ctx = await admit(limiter, team)
        remaining.append(int(ctx.reservation.headers["x-ratelimit-remaining-requests"]))
        await finish(limiter, ctx, 3)
    assert remaining == list(range(9_999, 9_959, -1))


async def test_expired_grants_go_back_and_their_room_is_free_again(workers: Workers) -> None:
    clock = Clock()
    limit = 2_000
    limiter = workers.add(Limits(team=LimitValues(rpm=limit)), clock=clock)
    team = new_team()
    for _ in range(30):
        await finish(limiter, await admit(limiter, team), 1)
    assert limiter.grants is not None and len(limiter.grants) == 1
    assert await window_sum(limiter, team, "rq") > 30  # the grant is counted from the start

    clock.now += GRANT_MS / 1000
    ctx = await admit(limiter, team)  # the expired grant goes back in this admission's round trip
    assert ctx.reservation.calls  # through Redis
    await finish(limiter, ctx, 1)
    await limiter.close()
    assert await window_sum(limiter, team, "rq") == 31


async def test_a_spend_budget_of_an_unpriced_model_needs_no_round_trip_while_under_it(workers: Workers) -> None:
    limiter = workers.add(Limits(team=LimitValues(rpm=10**6, daily_cost_usd=Decimal(5))), price=None)
    team = new_team()
    local = 0
    for _ in range(50):
        ctx = await admit(limiter, team)
        local += not ctx.reservation.calls
        await finish(limiter, ctx, 1, price=None)
    assert local >= 35


async def test_a_grant_that_no_longer_fits_does_not_cost_the_request_its_place(workers: Workers) -> None:
    limit = 1_000
    limits = Limits(team=LimitValues(rpm=limit))
    team = new_team()
    stale = workers.add(limits)
    exact = workers.add(limits, grants=False)
    await admit(stale, team)  # this worker last saw 1 of 1,000 used, so it will ask for a grant of 8 more...
    for _ in range(limit - 5):
        await admit(exact, team)  # ...but the other worker leaves room for only 4
    for _ in range(4):
        ctx = await admit(stale, team)
        assert ctx.reservation.calls  # through Redis, without a grant
    with pytest.raises(RateLimited):
        await admit(stale, team)
    assert await window_sum(stale, team, "rq") == limit


async def test_requests_still_running_when_their_grant_goes_back_settle_in_redis(workers: Workers) -> None:
    # 100 ms buckets: requests admitted from grants of one bucket finish after it ended and their grants went back.
    limits = Limits(window_seconds=60, buckets_per_window=600, team=LimitValues(rpm=10**6, tpm=10**9))
    limiter = workers.add(limits)
    team = new_team()
    running: list[RequestContext] = []
    buckets: set[int] = set()
    while len(buckets) < 4:  # until the requests held span four buckets (Redis' clock)
        running.append(await admit(limiter, team))
        buckets.add(await limiter.store.time_ms() // 100)
    assert any(not ctx.reservation.calls for ctx in running)  # some were admitted from grants
    used = 0
    for ctx in running:
        tokens, _ = await finish(limiter, ctx, random.choice([0, 10, 40]))  # refunds and debts
        used += tokens
    await limiter.close()
    assert await window_sum(limiter, team, "rq", bucket_ms=100) == len(running)
    assert await window_sum(limiter, team, "tk", bucket_ms=100) == used


async def test_a_worker_forgets_quiet_keys_so_its_memory_follows_the_keys_in_use(workers: Workers) -> None:
    clock = Clock()
    limiter = workers.add(Limits(team=LimitValues(rpm=10**6), key=LimitValues(rpm=10**6)), clock=clock)
    assert limiter.grants is not None
    for _ in range(300):  # 300 keys of their own teams, one request each
        await finish(limiter, await admit(limiter, new_team()), 1)
    assert limiter.grants.remembered == 600  # each key's and its team's window

    clock.now += SEEN_SECONDS / 2
    busy = new_team()
    await finish(limiter, await admit(limiter, busy), 1)
    clock.now += SEEN_SECONDS / 2
    limiter.grants.due()  # the sweep
    assert limiter.grants.remembered == 2  # only the key used since

    for _ in range(20):  # and it still gets grants once busy again
        await finish(limiter, await admit(limiter, busy), 1)
    assert len(limiter.grants) == 2


async def test_a_key_gets_a_grant_when_its_pace_says_the_grant_will_be_used(workers: Workers) -> None:
    """A key sending a request every 0.8 s: a grant reserved 0.5 s into its period (1.5 s to live) admits the
    key's next request in the worker; one reserved 1.5 s in (0.5 s to live) would expire unused, so none is."""
    clock, wall = Clock(), Clock()
    limiter = workers.add(Limits(key=LimitValues(rpm=10**6)), clock=clock, wall=wall)

    async def third_request_local(second_at: float) -> bool:
        key = new_team()
        await finish(limiter, await admit(limiter, key), 1)  # first sight of the key: never a grant
        clock.now += 0.8
        wall.now = 1_000 * (GRANT_MS / 1000) + second_at  # whole periods, then where the second request falls
        await finish(limiter, await admit(limiter, key), 1)  # a grant beside it, if it will be used
        ctx = await admit(limiter, key)
        await finish(limiter, ctx, 1)
        return not ctx.reservation.calls

    assert await third_request_local(second_at=0.5)
    assert not await third_request_local(second_at=1.5)


def team_keys(count: int) -> list[KeyRecord]:
    team_id = random.randrange(10**9)
    return [key_record(f"key{team_id}-{index}", team_id, f"team{team_id}") for index in range(count)]


async def key_window_sum(limiter: QuotaLimiter, key: KeyRecord, what: str, bucket_ms: int = 2_000) -> int:
    assert isinstance(limiter.store, RedisStore)
    redis_key = f"gw:v1:{{t:{key.team_id}}}:{what}:{bucket_ms}:key:{key.key_id}"
    return int(await limiter.store.client.hget(redis_key, "s") or 0)


def only_key_checks_sent(ctx: RequestContext) -> bool:
    scopes = [check.scope for call in ctx.reservation.calls for check in call.checks]
    return bool(scopes) and all(scope is not None and scope.scope == "key" for scope in scopes)


async def test_quiet_keys_of_a_busy_team_send_only_their_own_checks_to_redis(workers: Workers) -> None:
    limits = Limits(team=LimitValues(rpm=10**6, tpm=10**9, concurrency=10**4), key=LimitValues(rpm=10**6))
    limiter = workers.add(limits)
    keys = team_keys(100)  # each used twice: too rarely for a grant of its own, while the team's checks are busy
    used_tokens = 0
    partly_local = 0
    for key in keys + keys:
        ctx = await admit(limiter, key)
        partly_local += only_key_checks_sent(ctx)  # the team's checks came from the worker's grants
        tokens, _ = await finish(limiter, ctx, random.choice([0, 5, 20, 35]))
        used_tokens += tokens
    assert partly_local >= 150

    await limiter.close()
    assert await window_sum(limiter, keys[0], "rq") == 200
    assert await window_sum(limiter, keys[0], "tk") == used_tokens
    assert [await key_window_sum(limiter, key, "rq") for key in keys] == [2] * 100
    assert isinstance(limiter.store, RedisStore)
    assert await limiter.store.client.zcard(f"gw:v1:{{t:{keys[0].team_id}}}:cc:team") == 0


async def test_a_key_refused_by_redis_gives_back_what_its_team_grant_lent_it(workers: Workers) -> None:
    limits = Limits(team=LimitValues(rpm=10**6, concurrency=10**4), key=LimitValues(rpm=40))
    limiter = workers.add(limits)
    busy, *others = team_keys(30)
    for key in others:  # warm the team's grants
        await finish(limiter, await admit(limiter, key), 1)
    admitted = 0
    with pytest.raises(RateLimited):
        for _ in range(41):
            ctx = await admit(limiter, busy)
            await finish(limiter, ctx, 1)
            admitted += 1
    assert admitted == 40  # the key's own limit, exactly

    held = [await admit(limiter, key) for key in others]  # the team's grants still lend to the other keys
    assert any(only_key_checks_sent(ctx) for ctx in held)
    for ctx in held:
        await finish(limiter, ctx, 1)
    await limiter.close()
    assert await window_sum(limiter, busy, "rq") == 40 + 2 * len(others)  # the refused request left nothing behind
    assert isinstance(limiter.store, RedisStore)
    assert await limiter.store.client.zcard(f"gw:v1:{{t:{busy.team_id}}}:cc:team") == 0


async def key_budget(limiter: QuotaLimiter, key: KeyRecord, what: str, period: str) -> int:
    assert isinstance(limiter.store, RedisStore)
    return int(await limiter.store.client.get(f"gw:v1:{{t:{key.team_id}}}:{what}:key:{key.key_id}:{period}") or 0)


async def test_grants_used_in_a_period_are_renewed_so_the_next_period_starts_in_the_worker(workers: Workers) -> None:
    clock = Clock()
    limits = Limits(
        key=LimitValues(rpm=10**6, tpm=10**9, concurrency=10**4, daily_tokens=10**12),
        team=LimitValues(rpm=10**6, monthly_cost_usd=Decimal(10**6)),
    )
    limiter = workers.add(limits, clock=clock)
    key, idle = new_team(), new_team()
    used_tokens = 0
    for _ in range(3):  # the first asks Redis, the second reserves grants beside it, the third uses them
        used_tokens += (await finish(limiter, await admit(limiter, key), 5))[0]
    for _ in range(2):  # grants reserved, never used
        await finish(limiter, await admit(limiter, idle), 5)

    clock.now += GRANT_MS / 1000  # the period is over: every grant has expired
    before = await evalsha_calls(limiter)
    await limiter.renew_grants()
    # One admission per scope used (the key's, its team's), after one settlement giving back what the old grants
    # of the slot had left.
    assert await evalsha_calls(limiter) - before == 1 + 2
    # Concurrency: twice the slots that were in use at once (one), not a slot per request admitted.
    assert isinstance(limiter.store, RedisStore)
    assert await limiter.store.client.zcard(f"gw:v1:{{t:{key.team_id}}}:cc:key:{key.key_id}") == 2

    renewed = await admit(limiter, key)
    assert renewed.reservation.taken and not renewed.reservation.calls  # admitted in the worker
    used_tokens += (await finish(limiter, renewed, 7))[0]
    not_renewed = await admit(limiter, idle)
    assert not_renewed.reservation.calls  # its grants were not used: they went back, not round again
    await finish(limiter, not_renewed, 5)

    await limiter.close()
    periods = Periods.at(int(time.time() * 1000))
    assert await key_window_sum(limiter, key, "rq") == 4
    assert await key_window_sum(limiter, key, "tk") == used_tokens
    assert await key_budget(limiter, key, "bt", periods.day_id) == used_tokens
    assert await window_sum(limiter, key, "rq") == 4
    assert isinstance(limiter.store, RedisStore)
    assert await limiter.store.client.zcard(f"gw:v1:{{t:{key.team_id}}}:cc:key:{key.key_id}") == 0


def test_renewal_trips_carry_more_scopes_when_the_last_one_was_slow() -> None:
    """A slow round trip waited for a busy event loop, not for Redis: the next carries more, within a bound."""
    assert renewals_per_trip(0.0) == renewals_per_trip(0.0005) == RENEWALS_PER_TRIP  # an idle worker: a few
    assert renewals_per_trip(0.013) == 130  # a loaded worker's turn of its loop
    assert renewals_per_trip(10.0) == MAX_RENEWALS_PER_TRIP


async def test_a_period_of_renewals_takes_fewer_trips_once_trips_are_slow(workers: Workers) -> None:
    clock = Clock()
    limiter = workers.add(Limits(key=LimitValues(rpm=10**6)), clock=clock)
    keys = [new_team() for _ in range(40)]
    for _ in range(3):  # each key's grant reserved and used
        for key in keys:
            await finish(limiter, await admit(limiter, key), 5)
    trips = 0
    admit_in_store = limiter.store.admit

    async def counted(*args: object) -> object:
        nonlocal trips
        trips += 1
        return await admit_in_store(*args)  # type: ignore[arg-type]

    limiter.store.admit = counted  # type: ignore[method-assign]
    limiter._renewal_trip_seconds = 0.013  # the last trip waited 13 ms for its reply
    clock.now += GRANT_MS / 1000
    await limiter.renew_grants()
    assert trips == 1  # 40 scopes in one trip, not five of eight
    assert len(limiter.grants or ()) == 40
    for key in keys:  # every key renewed: admitted in the worker
        ctx = await admit(limiter, key)
        assert ctx.reservation.taken and not ctx.reservation.calls
        await finish(limiter, ctx, 5)


async def test_a_renewal_that_no_longer_fits_reserves_nothing_and_the_limit_holds(workers: Workers) -> None:
    clock = Clock()
    limit = 200
    limits = Limits(team=LimitValues(rpm=limit))
    granted = workers.add(limits, clock=clock)
    exact = workers.add(limits, grants=False)
    team = new_team()
    admitted = 0
    for _ in range(3):
        await finish(granted, await admit(granted, team), 1)
        admitted += 1
    with pytest.raises(RateLimited):  # another worker takes all the room the grant left
        while True:
            await finish(exact, await admit(exact, team), 1)
            admitted += 1

    clock.now += GRANT_MS / 1000
    await granted.renew_grants()  # gives the grant's unused room back; a new one no longer fits
    assert granted.grants is not None and len(granted.grants) == 0
    while admitted < limit + 1:
        try:
            await finish(granted, await admit(granted, team), 1)
        except RateLimited:
            break
        admitted += 1
    assert admitted == limit
    await granted.close()
    assert await window_sum(granted, team, "rq") == limit


async def test_a_renewal_sized_for_limits_that_changed_meanwhile_goes_back(workers: Workers) -> None:
    clock = Clock()
    limiter = workers.add(Limits(team=LimitValues(rpm=10**6, concurrency=10**4)), clock=clock)
    team = new_team()
    for _ in range(3):
        await finish(limiter, await admit(limiter, team), 1)
    clock.now += GRANT_MS / 1000
    grants = limiter.grants
    assert grants is not None
    renewals = grants.renewals()
    assert renewals
    grants.expire_all()  # a new snapshot while the renewal was on its way
    ended = [grant for renewal in renewals for grant in renewal.ended if grant is not None]
    results = await limiter.store.admit([renewal.call for renewal in renewals], grants.returns(ended))
    grants.renewed(renewals, results)
    assert len(grants) == 0

    await limiter.close()
    assert await window_sum(limiter, team, "rq") == 3
    assert isinstance(limiter.store, RedisStore)
    assert await limiter.store.client.zcard(f"gw:v1:{{t:{team.team_id}}}:cc:team") == 0


async def test_renewals_are_due_just_after_each_period_begins_on_the_store_clock(workers: Workers) -> None:
    clock = Clock()
    limiter = workers.add(Limits(team=LimitValues(rpm=10**6)), clock=clock)
    grants = limiter.grants
    assert grants is not None
    assert grants.until_renewal() == GRANT_MS / 1000  # nothing reserved yet: no idea where periods begin
    team = new_team()
    for _ in range(2):
        ctx = await admit(limiter, team)
    grant = ctx.reservation.taken[0][0]
    assert grant is not None
    assert grants.until_renewal() == 0  # the period under way was never renewed: at once
    await limiter.renew_grants()  # nothing has ended yet: nothing to renew
    assert len(grants) == 1
    left = grant.valid_until - clock.now  # the grant ends with its period
    assert grants.until_renewal() == pytest.approx(left + RENEW_DELAY)
    clock.now = grant.valid_until + RENEW_DELAY / 2
    assert grants.until_renewal() == pytest.approx(RENEW_DELAY / 2)
    clock.now = grant.valid_until + RENEW_DELAY
    await limiter.renew_grants()
    assert grants.until_renewal() == pytest.approx(GRANT_MS / 1000)
    await finish(limiter, ctx, 1)


async def test_a_renewal_cut_off_by_shutdown_leaves_nothing_reserved(workers: Workers) -> None:
    clock = Clock()
    limits = Limits(team=LimitValues(rpm=10**6, concurrency=10**4, daily_tokens=10**12))
    limiter = workers.add(limits, clock=clock)
    team = new_team()
    used_tokens = 0
    for _ in range(3):
        used_tokens += (await finish(limiter, await admit(limiter, team), 5))[0]
    clock.now += GRANT_MS / 1000

    renewal = asyncio.create_task(limiter.renew_grants())
    await asyncio.sleep(0)  # one turn of the loop: the renewal is waiting for its round trip
    renewal.cancel()
    with pytest.raises(asyncio.CancelledError):
        await renewal
    await limiter.close()  # what the renewal reserved goes back with the rest

    periods = Periods.at(int(time.time() * 1000))
    assert await window_sum(limiter, team, "rq") == 3
    assert await budget(limiter, team, "bt", periods.day_id) == used_tokens
    assert isinstance(limiter.store, RedisStore)
    assert await limiter.store.client.zcard(f"gw:v1:{{t:{team.team_id}}}:cc:team") == 0
