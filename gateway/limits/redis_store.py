"""The Redis side of the limiter: the Lua scripts, called with EVALSHA (reloaded on NOSCRIPT), pipelined so
that a request costs at most one round trip to admit (none when its worker's grants cover it) and its settlement
rides with its usage record, whatever the number of scopes."""

from __future__ import annotations

from collections.abc import Sequence
from importlib import resources
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError, ResponseError

from gateway.limits.checks import Check, Periods
from gateway.limits.store import AdmitCall, AdmitResult, Returning, SettleCall
from gateway.redis_client import Pipeliner


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
    def __init__(self, client: aioredis.Redis, *, url: str | None = None, timeout: float = 1.0) -> None:
        self.client = client
        # Admissions and settlements of all requests in one turn of the event loop share one pipeline.
        self.pipeliner = Pipeliner(client, url, timeout)

    async def _run_script(
        self, script: _Script, calls: Sequence[tuple[list[str], list[Any]]], before: Sequence[tuple[Any, ...]] = ()
    ) -> list[Any]:
        """Run the script once per call, in the shared pipeline after the commands `before` (their replies are
        dropped); on NOSCRIPT (Redis restarted or was flushed) load it and run the calls again."""
        for _attempt in range(2):
            sha = await script.ensure(self.client)
            commands = [("EVALSHA", sha, len(keys), *keys, *args) for keys, args in calls]
            results = (await self.pipeliner.execute([*before, *commands]))[len(before) :]
            before = ()
            if any(isinstance(result, NoScriptError) for result in results):
                script.sha = None
                continue
            for result in results:
                if isinstance(result, ResponseError):
                    raise result
            return results
        raise NoScriptError("script could not be loaded")

    async def _evalsha_many(self, script: _Script, calls: Sequence[tuple[list[str], list[Any]]]) -> list[Any]:
        return await self._run_script(script, calls)

    async def admit(self, calls: Sequence[AdmitCall], returning: Returning | None = None) -> list[AdmitResult]:
        """Admit the calls; grants `returning` go back first, in the same round trip, so the calls see their room."""
        encoded = [
            admit_args(call.checks, call.request_id, call.periods, call.clamp_completion, call.prompt_estimate)
            for call in calls
        ]
        before: list[tuple[Any, ...]] = []
        if returning is not None:
            settle, release = returning
            refunds = [settle_args(call.checks, call.deltas, call.request_id, call.admitted_ms) for call in settle]
            if refunds:
                sha = await SETTLE.ensure(self.client)
                before += [("EVALSHA", sha, len(keys), *keys, *args) for keys, args in refunds if keys]
            before += [("ZREM", key, *members) for key, members in release]
        return [_result(raw) for raw in await self._run_script(ADMIT, encoded, before)]

    async def settle(self, calls: Sequence[SettleCall]) -> None:
        encoded = [settle_args(call.checks, call.deltas, call.request_id, call.admitted_ms) for call in calls]
        encoded = [(keys, args) for keys, args in encoded if keys]
        if encoded:
            await self._run_script(SETTLE, encoded)

    async def settle_and_append(self, calls: Sequence[SettleCall], stream: str, data: bytes) -> None:
        """Settle a request's limits and append its usage record to `stream`, in the shared pipeline (one round
        trip). Raises if the record was not appended; a settlement that fails because the script is missing is
        redone after loading it; other settlement failures are only lost settlements (the record matters)."""
        encoded = [settle_args(call.checks, call.deltas, call.request_id, call.admitted_ms) for call in calls]
        encoded = [(keys, args) for keys, args in encoded if keys]
        sha = await SETTLE.ensure(self.client) if encoded else ""
        commands: list[tuple[Any, ...]] = [("EVALSHA", sha, len(keys), *keys, *args) for keys, args in encoded]
        commands.append(("XADD", stream, "*", "d", data))
        results = await self.pipeliner.execute(commands)
        if isinstance(results[-1], Exception):
            raise results[-1]
        missing = [call for call, result in zip(encoded, results, strict=False) if isinstance(result, NoScriptError)]
        if missing:
            SETTLE.sha = None
            await self._run_script(SETTLE, missing)

    async def release(self, key: str, members: Sequence[str]) -> None:
        """Give back concurrency slots (a worker's unused grant), in the shared pipeline."""
        results = await self.pipeliner.execute([("ZREM", key, *members)])
        if isinstance(results[0], Exception):
            raise results[0]

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
