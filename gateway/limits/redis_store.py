"""The Redis side of the limiter: the Lua scripts, called with EVALSHA (reloaded on NOSCRIPT), pipelined so
that one request costs one round trip to admit and one to settle, whatever the number of scopes."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from importlib import resources
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError, ResponseError

from gateway.batching import Coalescer
from gateway.limits.checks import Check, Periods
from gateway.limits.store import AdmitCall, AdmitResult, SettleCall


def _script(name: str) -> str:
    return resources.files("gateway.limits").joinpath("lua", name).read_text()


class _Script:
    """A Lua script addressed by its SHA (which versions it); loaded into Redis on first use or after a flush."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha: str | None = None

    async def ensure(self, client: aioredis.Redis) -> str:
        if self.sha is None:
            self.sha = await client.script_load(self.source)
        return self.sha


ADMIT = _Script(_script("admit_v1.lua"))
SETTLE = _Script(_script("settle_v1.lua"))
REBUILD = _Script(_script("rebuild_v1.lua"))


def admit_args(
    checks: Sequence[Check], request_id: str, periods: Periods, clamp_completion: int, prompt_estimate: int
) -> tuple[list[str], list[Any]]:
    keys = [check.key for check in checks]
    args: list[Any] = [
        request_id,
        len(checks),
        periods.day_start,
        periods.day_end,
        periods.month_start,
        periods.month_end,
        clamp_completion,
        prompt_estimate,
    ]
    for check in checks:
        args += [check.kind, check.limit, check.amount, check.p1, check.p2, 1 if check.tokens else 0]
    return keys, args


def settle_args(
    checks: Sequence[Check], deltas: Sequence[int], request_id: str, admitted_ms: int
) -> tuple[list[str], list[Any]]:
    keys: list[str] = []
    args: list[Any] = [request_id, 0, admitted_ms]
    for check, delta in zip(checks, deltas, strict=True):
        if check.kind == "mk" or (check.kind != "cc" and delta == 0):
            continue
        keys.append(check.key)
        args += [check.kind, delta, check.p1, check.p2]
    args[1] = len(keys)
    return keys, args


def _result(raw: Sequence[Any]) -> AdmitResult:
    code, now_ms, failed, retry_ms, granted = (int(value) for value in raw[:5])
    return AdmitResult(
        code=code,
        now_ms=now_ms,
        failed=failed - 1,
        retry_ms=retry_ms,
        granted=granted,
        values=[int(value) for value in raw[5:]],
    )


class RedisStore:
    def __init__(self, client: aioredis.Redis) -> None:
        self.client = client
        # Admissions of requests arriving in the same turn of the event loop share one pipeline.
        self._admissions: Coalescer[tuple[list[str], list[Any]], Any] = Coalescer(self._admit_batch)

    async def _admit_batch(self, encoded: list[tuple[list[str], list[Any]]]) -> list[Any]:
        return await self._evalsha_many(ADMIT, encoded)

    async def _evalsha_many(self, script: _Script, calls: Sequence[tuple[list[str], list[Any]]]) -> list[Any]:
        """One round trip for all calls; on NOSCRIPT (Redis restarted or flushed) load the script and redo."""
        for _attempt in range(2):
            sha = await script.ensure(self.client)
            if len(calls) == 1:
                keys, args = calls[0]
                try:
                    return [await self.client.evalsha(sha, len(keys), *keys, *args)]
                except NoScriptError:
                    script.sha = None
                    continue
            async with self.client.pipeline(transaction=False) as pipe:
                for keys, args in calls:
                    pipe.evalsha(sha, len(keys), *keys, *args)
                results = await pipe.execute(raise_on_error=False)
            if any(isinstance(result, NoScriptError) for result in results):
                script.sha = None
                continue
            for result in results:
                if isinstance(result, ResponseError):
                    raise result
            return list(results)
        raise NoScriptError("script could not be loaded")

    async def admit(self, calls: Sequence[AdmitCall]) -> list[AdmitResult]:
        encoded = [
            admit_args(call.checks, call.request_id, call.periods, call.clamp_completion, call.prompt_estimate)
            for call in calls
        ]
        if len(encoded) == 1:
            return [_result(await self._admissions.submit(encoded[0]))]
        return [_result(raw) for raw in await asyncio.gather(*(self._admissions.submit(item) for item in encoded))]

    async def settle(self, calls: Sequence[SettleCall]) -> None:
        encoded = [settle_args(call.checks, call.deltas, call.request_id, call.admitted_ms) for call in calls]
        await self._evalsha_many(SETTLE, [(keys, args) for keys, args in encoded if keys])

    async def settle_and_append_many(
        self, items: Sequence[tuple[Sequence[SettleCall], bytes]], stream: str
    ) -> list[bool]:
        """For each (settlements, record): settle and append the record to `stream`, all in one round trip.
        Returns, per item, whether its record was appended. A settlement that fails for a missing script is redone
        after loading it; other settlement failures are only lost settlements (the record is what matters)."""
        encoded = [
            [
                (keys, args)
                for keys, args in (settle_args(c.checks, c.deltas, c.request_id, c.admitted_ms) for c in calls)
                if keys
            ]
            for calls, _ in items
        ]
        sha = await SETTLE.ensure(self.client) if any(encoded) else ""
        async with self.client.pipeline(transaction=False) as pipe:
            for settles, (_, data) in zip(encoded, items, strict=True):
                for keys, args in settles:
                    pipe.evalsha(sha, len(keys), *keys, *args)
                pipe.xadd(stream, {"d": data})
            results = await pipe.execute(raise_on_error=False)
        appended: list[bool] = []
        redo: list[tuple[list[str], list[Any]]] = []
        position = 0
        for settles in encoded:
            settle_results = results[position : position + len(settles)]
            position += len(settles)
            appended.append(not isinstance(results[position], Exception))
            position += 1
            redo += [
                call for call, result in zip(settles, settle_results, strict=True) if isinstance(result, NoScriptError)
            ]
        if redo:
            SETTLE.sha = None
            await self._evalsha_many(SETTLE, redo)
        return appended

    async def renew(self, leases: Sequence[tuple[str, str, int]]) -> None:
        """Push back the expiry of leases still held (`ZADD XX`: a lease that already expired stays gone)."""
        async with self.client.pipeline(transaction=False) as pipe:
            for key, member, expires_ms in leases:
                pipe.zadd(key, {member: expires_ms}, xx=True)
                pipe.pexpireat(key, expires_ms, gt=True)  # never shortens the key's life, only extends it
            await pipe.execute()

    async def rebuild(self, marker: str, counters: Sequence[tuple[str, int, int]]) -> bool:
        keys = [marker] + [key for key, _, _ in counters]
        args: list[Any] = [len(counters)]
        for _, value, ttl in counters:
            args += [value, ttl]
        result = await self._evalsha_many(REBUILD, [(keys, args)])
        return bool(result[0])

    async def time_ms(self) -> int:
        seconds, micros = await self.client.time()
        return int(seconds) * 1000 + int(micros) // 1000
