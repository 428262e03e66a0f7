"""Where limit state lives: the interface both stores implement, and the in-process store.

`RedisStore` (redis_store.py) runs the Lua scripts; `LocalStore` here implements the very same algorithm in
Python for the embedded single-process mode, with `time.time()` as its clock. The behavioural tests run against
both. The algorithm is documented in `lua/admit_v1.lua` and `lua/settle_v1.lua`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from gateway.limits.checks import Check, Periods


@dataclass(slots=True)
class AdmitCall:
    checks: Sequence[Check]
    request_id: str
    periods: Periods
    clamp_completion: int  # 0: never lower max_tokens
    prompt_estimate: int


@dataclass(slots=True)
class SettleCall:
    checks: Sequence[Check]
    deltas: Sequence[int]  # per check: real minus reserved
    request_id: str
    admitted_ms: int


@dataclass(slots=True)
class AdmitResult:
    code: int  # 0 admitted, 1 refused, 2 budget period mismatch, 3 budgets need a rebuild
    now_ms: int
    failed: int  # index of the refusing check, -1 if none
    retry_ms: int
    granted: int  # completion tokens granted by clamping, 0 if not clamped
    values: list[int] = field(default_factory=list)

    ADMITTED = 0
    REFUSED = 1
    PERIOD_MISMATCH = 2
    NEEDS_REBUILD = 3


# Grants going back (grants.py): settlements of their unused amounts, and concurrency slots (key, members) to free.
Returning = tuple[list[SettleCall], list[tuple[str, list[str]]]]


class LimitStore(Protocol):
    async def admit(self, calls: Sequence[AdmitCall], returning: Returning | None = None) -> list[AdmitResult]: ...

    async def settle(self, calls: Sequence[SettleCall]) -> None: ...

    async def release(self, key: str, members: Sequence[str]) -> None: ...

    async def renew(self, leases: Sequence[tuple[str, str, int]]) -> None: ...

    async def rebuild(self, marker: str, counters: Sequence[tuple[str, int, int]]) -> bool: ...

    async def time_ms(self) -> int: ...


@dataclass(slots=True)
class _Window:
    total: int = 0
    oldest: int | None = None
    buckets: dict[int, int] = field(default_factory=dict)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class LocalStore:
    """One process's limits in memory. Budgets are rebuilt from SQL at start-up (like a Redis that lost data)."""

    def __init__(self) -> None:
        self._windows: dict[str, _Window] = {}
        self._leases: dict[str, dict[str, int]] = {}
        self._counters: dict[str, int] = {}
        self._markers: set[str] = set()

    # --- sliding windows ---

    def _sum(self, key: str, window_ms: int, bucket_ms: int, now: int) -> int:
        state = self._windows.get(key)
        if state is None or state.oldest is None:
            return 0
        first_live = math.floor((now - window_ms) / bucket_ms)
        if state.oldest < first_live:
            if first_live - state.oldest > math.ceil(window_ms / bucket_ms) + 1:
                del self._windows[key]
                return 0
            for index in range(state.oldest, first_live):
                state.total -= state.buckets.pop(index, 0)
            state.oldest = first_live
        return state.total

    def _retry(self, key: str, window_ms: int, bucket_ms: int, total: int, amount: int, limit: int, now: int) -> int:
        state = self._windows.get(key)
        first_live, current = math.floor((now - window_ms) / bucket_ms), now // bucket_ms
        freed = 0
        for index in range(first_live, current + 1):
            freed += state.buckets.get(index, 0) if state else 0
            if total - freed + amount <= limit:
                return (index + 1) * bucket_ms + window_ms - now
        return (current + 1) * bucket_ms + window_ms - now

    # --- the interface ---

    async def admit(self, calls: Sequence[AdmitCall], returning: Returning | None = None) -> list[AdmitResult]:
        if returning is not None:
            settle, release = returning
            await self.settle(settle)
            for key, members in release:
                await self.release(key, members)
        return [self._admit_one(call, _now_ms()) for call in calls]

    def _current(self, check: Check, now: int, periods: Periods) -> int | None:
        if check.kind == "sw":
            return self._sum(check.key, check.p1, check.p2, now)
        if check.kind == "cc":
            leases = self._leases.setdefault(check.key, {})
            for member in [member for member, expiry in leases.items() if expiry <= now]:
                del leases[member]
            return len(leases)
        if check.kind == "mk":
            return 0 if check.key in self._markers else None
        start, end = (
            (periods.day_start, periods.day_end)
            if check.kind == "bd"
            else (
                periods.month_start,
                periods.month_end,
            )
        )
        if not start <= now < end:
            return -1
        return self._counters.get(check.key, 0)

    def _admit_one(self, call: AdmitCall, now: int) -> AdmitResult:
        checks = call.checks
        usage: list[int] = []
        for index, check in enumerate(checks):
            current = self._current(check, now, call.periods)
            if current is None:
                return AdmitResult(AdmitResult.NEEDS_REBUILD, now, index, 0, 0)
            if current < 0:
                return AdmitResult(AdmitResult.PERIOD_MISMATCH, now, index, 0, 0)
            usage.append(current)
        amounts = [check.amount for check in checks]
        granted = self._clamp(call, checks, usage, amounts)
        for index, check in enumerate(checks):
            refused = self._refuses(check, usage[index], amounts[index])
            if refused:
                retry = -1
                if check.kind == "sw":
                    retry = self._retry(check.key, check.p1, check.p2, usage[index], amounts[index], check.limit, now)
                elif check.kind == "cc":
                    retry = 1000
                return AdmitResult(AdmitResult.REFUSED, now, index, retry, 0)
        values = [self._apply(check, usage[i], amounts[i], call.request_id, now) for i, check in enumerate(checks)]
        return AdmitResult(AdmitResult.ADMITTED, now, -1, 0, granted, values)

    @staticmethod
    def _clamp(call: AdmitCall, checks: Sequence[Check], usage: list[int], amounts: list[int]) -> int:
        if call.clamp_completion <= 0:
            return 0
        room = call.clamp_completion
        for index, check in enumerate(checks):
            enforced = check.kind not in ("bd", "bm") or check.p2 == 1
            if check.tokens and enforced:
                room = min(room, check.limit - usage[index] - call.prompt_estimate)
        if not 1 <= room < call.clamp_completion:
            return 0
        for index, check in enumerate(checks):
            if check.tokens:
                amounts[index] = call.prompt_estimate + room
        return room

    @staticmethod
    def _refuses(check: Check, current: int, amount: int) -> bool:
        if check.kind == "mk":
            return False
        soft_budget = check.kind in ("bd", "bm") and check.p2 == 0
        return current + amount > check.limit and not soft_budget

    def _apply(self, check: Check, current: int, amount: int, request_id: str, now: int) -> int:
        if check.kind == "sw":
            state = self._windows.setdefault(check.key, _Window())
            if state.oldest is None:
                state.oldest = math.floor((now - check.p1) / check.p2)
            index = now // check.p2
            state.buckets[index] = state.buckets.get(index, 0) + amount
            state.total += amount
            return current + amount
        if check.kind == "cc":
            held = self._leases.setdefault(check.key, {})
            held[request_id] = now + check.p1
            for slot in range(1, amount):
                held[f"{request_id}:{slot}"] = now + check.p1
            return current + amount
        if check.kind == "mk":
            return 0
        self._counters[check.key] = current + amount
        return current + amount

    async def settle(self, calls: Sequence[SettleCall]) -> None:
        now = _now_ms()
        for call in calls:
            for check, delta in zip(call.checks, call.deltas, strict=True):
                self._settle_one(check, delta, call.request_id, call.admitted_ms, now)

    def _settle_one(self, check: Check, delta: int, request_id: str, admitted_ms: int, now: int) -> None:
        if check.kind == "cc":
            self._leases.get(check.key, {}).pop(request_id, None)
        elif check.kind == "sw" and delta:
            state = self._windows.setdefault(check.key, _Window())
            index = admitted_ms // check.p2
            live = state.oldest is not None and index >= state.oldest and index in state.buckets
            if delta < 0:
                if live:
                    refund = max(delta, -state.buckets[index])
                    state.buckets[index] += refund
                    state.total += refund
                return
            if not live:
                index = now // check.p2
                if state.oldest is None:
                    state.oldest = math.floor((now - check.p1) / check.p2)
            state.buckets[index] = state.buckets.get(index, 0) + delta
            state.total += delta
        elif check.kind in ("bd", "bm") and delta:
            self._counters[check.key] = max(0, self._counters.get(check.key, 0) + delta)

    async def release(self, key: str, members: Sequence[str]) -> None:
        held = self._leases.get(key, {})
        for member in members:
            held.pop(member, None)

    async def renew(self, leases: Sequence[tuple[str, str, int]]) -> None:
        for key, member, expires_ms in leases:
            held = self._leases.get(key)
            if held is not None and member in held:
                held[member] = expires_ms

    async def rebuild(self, marker: str, counters: Sequence[tuple[str, int, int]]) -> bool:
        if marker in self._markers:
            return False
        for key, value, _ttl in counters:
            self._counters[key] = self._counters.get(key, 0) + value
        self._markers.add(marker)
        return True

    async def time_ms(self) -> int:
        return _now_ms()
