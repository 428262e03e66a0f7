"""QuotaLimiter's per-request caches: one set of checks per key (not per key and model), the team's checks
shared by every key, and nothing kept past its UTC day or its snapshot."""

from __future__ import annotations

import time
import uuid
from types import SimpleNamespace

import pytest

from gateway.auth.store import KeyRecord
from gateway.context import RequestContext
from gateway.limits import limiter as limiter_module
from gateway.limits import store as store_module
from gateway.limits.checks import DAY_MS, Check, Periods
from gateway.limits.limiter import QuotaLimiter
from gateway.limits.store import LocalStore
from gateway.metering.prices import PriceBook
from gateway.settings import Limits, LimitValues
from gateway.snapshot import Snapshot
from tests.harness import key_record

MODELS = ("chat-small", "chat-large", "embed")


def _key(index: int) -> KeyRecord:
    return key_record(f"key{index:04d}", 7, "research")


def _snapshot(version: int) -> Snapshot:
    return Snapshot(
        version=version, keys={}, prices=PriceBook({}), overrides={}, drains=frozenset(), loaded_at=time.time()
    )


async def _no_rebuild(slot: str, periods: Periods, now_ms: int) -> list[tuple[str, int, int]]:
    return []


def _limiter(snapshots: list[Snapshot]) -> QuotaLimiter:
    limits = Limits(
        key=LimitValues(rpm=10**6, tpm=10**9),
        team=LimitValues(rpm=10**6, tpm=10**9, daily_tokens=10**12),
    )
    return QuotaLimiter(
        LocalStore(),
        limits,
        snapshot=lambda: snapshots[-1],
        estimate_prompt=lambda endpoint, payload: 5,
        model_price=lambda model: None,
        rebuild_source=_no_rebuild,
        fail_open=False,
        timeout=1.0,
    )


async def _admit(limiter: QuotaLimiter, key: KeyRecord, model: str) -> RequestContext:
    ctx = RequestContext.begin(uuid.uuid4(), "chat")
    ctx.key, ctx.model, ctx.payload, ctx.max_tokens = key, model, {"messages": []}, 16
    await limiter.admit(ctx)
    assert ctx.reservation is not None
    return ctx


def _template_checks(limiter: QuotaLimiter) -> list[Check]:
    return [check for slots in limiter._templates.values() for checks in slots for check in checks]


async def test_one_template_per_key_and_the_team_checks_shared() -> None:
    limiter = _limiter([_snapshot(1)])
    keys = [_key(index) for index in range(20)]
    for key in keys:
        for model in MODELS:
            ctx = await _admit(limiter, key, model)
    assert len(limiter._templates) == len(keys)  # the models share their key's checks
    team_checks = [check for check in _template_checks(limiter) if check.key.endswith(":team") or ":d" in check.key]
    assert len(team_checks) == 3 * len(keys)  # rpm, tpm and the daily budget, in every key's template...
    assert len({id(check) for check in team_checks}) == 3  # ...as the same three objects
    # What a request reserves still names its own key's checks.
    assert any(check.key.endswith(f"key:{keys[-1].key_id}") for call in ctx.reservation.calls for check in call.checks)


async def test_yesterdays_checks_are_dropped_and_a_new_snapshot_starts_afresh(monkeypatch: pytest.MonkeyPatch) -> None:
    snapshots = [_snapshot(1)]
    limiter = _limiter(snapshots)
    for index in range(10):
        await _admit(limiter, _key(index), MODELS[0])
    assert len(limiter._templates) == 10

    tomorrow = time.time() + DAY_MS / 1000
    # The limiter's clock and the store's, both a day on.
    monkeypatch.setattr(limiter_module, "time", SimpleNamespace(time=lambda: tomorrow))
    monkeypatch.setattr(store_module, "_now_ms", lambda: int(tomorrow * 1000))
    ctx = await _admit(limiter, _key(0), MODELS[0])
    assert len(limiter._templates) == 1
    day = Periods.at(int(tomorrow * 1000)).day_id
    assert all(check.key.endswith(day) for check in _template_checks(limiter) if check.kind == "bd")
    assert ctx.reservation.calls[0].periods.day_id == day

    snapshots.append(_snapshot(2))
    await _admit(limiter, _key(1), MODELS[0])
    assert len(limiter._templates) == 1 and len(limiter._scope_cache) == 1
