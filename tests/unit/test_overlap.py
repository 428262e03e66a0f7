"""When the limiter lets a request's admission run beside its upstream request (`QuotaLimiter.overlaps`), over a
real Redis: only for scopes whose last admission here left a quarter of every limit, never after a refusal,
with clamping or without Redis; and the store's part of an admission (`begin`) is all that is left to await."""

from __future__ import annotations

import time
import uuid
from types import SimpleNamespace
from typing import Any

import pytest

from gateway.context import RequestContext
from gateway.errors import RateLimited
from gateway.limits import limiter as limiter_module
from gateway.limits.limiter import ROOMY_SECONDS, QuotaLimiter
from gateway.limits.store import LocalStore
from gateway.settings import Limits, LimitValues
from tests.limiters import SNAPSHOT, Clock, Workers, admit, new_team, team_key


def request(key_team: int) -> RequestContext:
    ctx = RequestContext.begin(uuid.uuid4(), "chat")
    ctx.key, ctx.model, ctx.payload, ctx.max_tokens = team_key(key_team), "chat-small", {"messages": []}, 20
    return ctx


def limits(rpm: int, **extra: Any) -> Limits:
    return Limits(window_seconds=60, local_grants=False, team=LimitValues(rpm=rpm), **extra)


async def test_scopes_overlap_while_their_last_admission_left_a_quarter_of_every_limit(workers: Workers) -> None:
    limiter = workers.add(limits(rpm=8), grants=False)
    key = new_team()
    ctx = request(key.team_id)
    assert not limiter.overlaps(ctx)  # nothing known yet
    decided = []
    for _ in range(8):
        await admit(limiter, key)
        decided.append(limiter.overlaps(request(key.team_id)))
    # 8 - n left after the n-th: room to spare while at least 2 (a quarter of 8) are.
    assert decided == [True] * 6 + [False] * 2


async def test_a_refusal_ends_the_overlap_until_an_admission_leaves_room_again(workers: Workers) -> None:
    limiter = workers.add(limits(rpm=8), grants=False)
    other = workers.add(limits(rpm=8), grants=False)  # another worker, using up the team's room meanwhile
    key = new_team()
    await admit(limiter, key)
    assert limiter.overlaps(request(key.team_id))
    for _ in range(7):
        await admit(other, key)
    assert limiter.overlaps(request(key.team_id))  # what this worker knows is stale until it asks again

    remote = limiter.begin(request(key.team_id))
    assert remote is not None  # no grants: the whole admission is the store's
    with pytest.raises(RateLimited):
        await remote
    assert not limiter.overlaps(request(key.team_id))


async def test_never_with_clamping_or_the_in_process_store(workers: Workers) -> None:
    key = new_team()
    clamping = workers.add(limits(rpm=100, clamp_max_tokens=True), grants=False)
    await admit(clamping, key)
    assert not clamping.overlaps(request(key.team_id))

    async def no_rebuild(*_: object) -> list[tuple[str, int, int]]:
        return []

    local = QuotaLimiter(
        LocalStore(),
        limits(rpm=100),
        snapshot=lambda: SNAPSHOT,
        estimate_prompt=lambda endpoint, payload: 10,
        model_price=lambda model: None,
        rebuild_source=no_rebuild,
        fail_open=False,
        timeout=1.0,
    )
    await admit(local, key)
    assert not local.overlaps(request(key.team_id))

    off = workers.add(limits(rpm=100, overlap_admission=False), grants=False)
    await admit(off, key)
    assert not off.overlaps(request(key.team_id))


async def test_a_request_admitted_from_grants_has_nothing_left_to_await(workers: Workers) -> None:
    limiter = workers.add(Limits(window_seconds=60, team=LimitValues(rpm=10_000)))
    key = new_team()
    left = []
    for _ in range(20):
        ctx = request(key.team_id)
        remote = limiter.begin(ctx)
        left.append(remote is not None)
        if remote is not None:
            await remote
        assert ctx.reservation is not None
    # The first asks Redis (and for a grant once the key is in use); the grant then admits the rest in the worker.
    assert left[0] and not all(left)
    assert left[-1] is False


async def test_a_busy_key_admitted_from_grants_keeps_its_room_to_spare(
    workers: Workers, monkeypatch: pytest.MonkeyPatch
) -> None:
    monotonic = Clock()  # the limiter's, moved by the test; the grants' own clock stands still, so they stay live
    monkeypatch.setattr(limiter_module, "time", SimpleNamespace(time=time.time, monotonic=monotonic))
    limiter = workers.add(Limits(window_seconds=60, team=LimitValues(rpm=10_000)), clock=Clock())
    key = new_team()
    for _ in range(3):  # through Redis, until the key is in use and has a grant
        await admit(limiter, key)
    assert limiter.overlaps(request(key.team_id))

    monotonic.now += ROOMY_SECONDS * 2 / 3
    assert limiter.begin(request(key.team_id)) is None  # admitted from the grant: no admission through Redis
    monotonic.now += ROOMY_SECONDS * 2 / 3
    # Past the mark of the last admission through Redis: the one the grant admitted renewed it.
    assert limiter.overlaps(request(key.team_id))
