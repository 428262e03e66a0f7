"""Saturation: deployment concurrency slots, and a fair queue for requests that find every slot taken.

A deployment's `max_concurrency` holds across all gateway processes and replicas when Redis is configured (a
sorted set of expiring leases per deployment, like the limiter's concurrency leases); without Redis, each
process counts its own. When every deployment of a model is full, requests wait in a bounded queue, served round
robin across teams (one team's burst cannot starve the others), higher priority classes first; past the bound, or
after the queue timeout, they get 429 with `retry-after`.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from gateway.redis_client import reraise_cancellation
from gateway.routing.table import DeploymentRuntime

_ACQUIRE = """
-- KEYS[1]: the deployment's lease set. ARGV: limit, member, lease ms. Time is Redis' own.
local time = redis.call("TIME")
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
redis.call("ZREMRANGEBYSCORE", KEYS[1], "-inf", now)
if redis.call("ZCARD", KEYS[1]) >= tonumber(ARGV[1]) then
  return 0
end
redis.call("ZADD", KEYS[1], now + tonumber(ARGV[3]), ARGV[2])
redis.call("PEXPIRE", KEYS[1], tonumber(ARGV[3]) * 2)
return 1
"""


def _slot_key(deployment: DeploymentRuntime) -> str:
    return f"gw:v1:{{d:{deployment.name}}}:slots"


class DeploymentSlots:
    def __init__(self, redis: aioredis.Redis | None, *, lease_seconds: float, timeout: float) -> None:
        self._redis = redis
        self._lease_ms = int(lease_seconds * 1000)
        self._timeout = timeout
        self._script = redis.register_script(_ACQUIRE) if redis is not None else None
        self._held: dict[tuple[str, str], DeploymentRuntime] = {}
        self.released = asyncio.Event()

    async def try_acquire(self, deployment: DeploymentRuntime, member: str) -> bool:
        limit = deployment.config.max_concurrency
        if limit is None:
            return True
        if self._script is not None:
            try:
                async with asyncio.timeout(self._timeout):
                    granted = await self._script(keys=[_slot_key(deployment)], args=[limit, member, self._lease_ms])
            except (RedisError, OSError, TimeoutError) as exc:
                reraise_cancellation(exc)  # a client that hung up meanwhile takes no slot
                granted = deployment.in_flight < limit  # Redis is down: count this process's own
        else:
            granted = deployment.in_flight < limit
        if granted:
            deployment.in_flight += 1
            self._held[(deployment.name, member)] = deployment
        return bool(granted)

    async def release(self, deployment: DeploymentRuntime, member: str) -> None:
        if self._held.pop((deployment.name, member), None) is None:
            return
        deployment.in_flight -= 1
        self.released.set()
        self.released = asyncio.Event()
        if self._redis is not None:
            try:
                async with asyncio.timeout(self._timeout):
                    await self._redis.zrem(_slot_key(deployment), member)
            except (RedisError, OSError, TimeoutError) as exc:  # the lease expires by itself
                reraise_cancellation(exc)  # a client that hung up meanwhile gets no retry elsewhere

    async def renew_forever(self) -> None:
        """Keep the leases of long requests alive; a crashed process's leases simply expire."""
        while True:
            await asyncio.sleep(max(self._lease_ms / 3000, 0.5))
            if self._redis is None or not self._held:
                continue
            try:
                seconds, micros = await self._redis.time()
                expiry = int(seconds) * 1000 + int(micros) // 1000 + self._lease_ms
                async with self._redis.pipeline(transaction=False) as pipe:
                    for (_, member), deployment in list(self._held.items()):
                        pipe.zadd(_slot_key(deployment), {member: expiry}, xx=True)
                    await pipe.execute()
            except (RedisError, OSError, TimeoutError) as exc:  # renewed at the next beat, or the lease expires
                reraise_cancellation(exc)  # a shutdown must end this loop


class QueueFull(Exception):
    pass


@dataclass(slots=True)
class _Waiter:
    future: asyncio.Future[None]
    enqueued: float = field(default_factory=time.monotonic)


class FairQueue:
    """Waiting requests of one model: round robin across teams within a priority class, classes in order."""

    def __init__(self, max_waiting: int) -> None:
        self.max_waiting = max_waiting
        self._classes: dict[int, OrderedDict[str, deque[_Waiter]]] = {}
        self.size = 0

    def enqueue(self, team: str, priority: int, *, front: bool = False) -> asyncio.Future[None]:
        """`front`: a woken waiter that still found no slot goes back where it was: first of its team, and its
        team first in the round, so being woken for nothing never costs it its turn."""
        if self.size >= self.max_waiting and not front:
            raise QueueFull
        waiter = _Waiter(asyncio.get_running_loop().create_future())
        teams = self._classes.setdefault(priority, OrderedDict())
        waiters = teams.setdefault(team, deque())
        if front:
            waiters.appendleft(waiter)
            teams.move_to_end(team, last=False)
        else:
            waiters.append(waiter)
        self.size += 1
        return waiter.future

    def wake_next(self) -> bool:
        """Let the next waiter in fair order try for a slot. Its team moves to the back of the round."""
        for priority in sorted(self._classes, reverse=True):
            teams = self._classes[priority]
            while teams:
                team, waiters = next(iter(teams.items()))
                waiter = waiters.popleft()
                if waiters:
                    teams.move_to_end(team)
                else:
                    del teams[team]
                self.size -= 1
                if not waiter.future.done():
                    waiter.future.set_result(None)
                    return True
            del self._classes[priority]
        return False

    def remove(self, future: asyncio.Future[None]) -> None:
        """A waiter gave up (timeout, hang-up): take it out so it does not hold a place."""
        for teams in self._classes.values():
            for team, waiters in list(teams.items()):
                for waiter in waiters:
                    if waiter.future is future:
                        waiters.remove(waiter)
                        self.size -= 1
                        if not waiters:
                            del teams[team]
                        return
