"""The durable usage buffer: where a finished request's record goes before its client gets the last byte.

With Redis, the record is appended to a Redis Stream in the same pipeline (one round trip) that settles the
request's rate limits. Without Redis, or when Redis refuses or times out, it goes to the local spool instead
(fsynced). Either way `record` returns only once the record is durable, and never waits on SQL: the ledger
writer moves records from the buffer into SQL later, idempotently.

The buffer is bounded: past `metering.max_backlog` stream entries or `metering.max_spool_bytes` of spool, the
gateway stops admitting new requests (503) rather than drop records; it resumes once the writer catches up.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from gateway import metrics
from gateway.breaker import CircuitBreaker
from gateway.limits.redis_store import RedisStore
from gateway.limits.store import LimitStore, SettleCall
from gateway.metering.records import encode
from gateway.metering.spool import Spool
from gateway.redis_client import reraise_cancellation

log = logging.getLogger(__name__)

STREAM = "gw:v1:usage"


class LedgerBuffer:
    def __init__(
        self,
        spool: Spool,
        store: LimitStore,
        *,
        redis: aioredis.Redis | None,
        timeout: float,
        max_backlog: int,
        max_spool_bytes: int,
        enabled: bool = True,
    ) -> None:
        self.enabled = enabled
        self.spool = spool
        self.store = store
        self.redis = redis
        self.timeout = timeout
        self.max_backlog = max_backlog
        self.max_spool_bytes = max_spool_bytes
        self.breaker = CircuitBreaker(threshold=3, cooldown=1.0)
        self.full = False
        self.stream_backlog = 0
        self.spool_bytes = 0

    async def record(self, row: dict[str, Any], settle: Sequence[SettleCall]) -> None:
        if not self.enabled:
            if settle:
                await self.store.settle(settle)
            return
        data = encode(row)
        if isinstance(self.store, RedisStore) and self.redis is not None:
            if await self._to_stream(data, settle):
                return
            if settle:
                metrics.LIMITER_SETTLE_LOST.inc()
        elif settle:
            await self.store.settle(settle)  # in-process: no I/O
        await self.spool.append(data)
        metrics.USAGE_SPOOLED.inc()

    async def _to_stream(self, data: bytes, settle: Sequence[SettleCall]) -> bool:
        """Settle and append in one round trip (shared with every other request finishing in this turn of the
        event loop). True once the record is in the stream. The store's pipeline bounds the wait (`redis.timeout`)."""
        assert isinstance(self.store, RedisStore)
        if not self.breaker.allow():
            return False
        try:
            await self.store.settle_and_append(settle, STREAM, data)
        except (RedisError, OSError, TimeoutError) as exc:
            self.breaker.failure()
            if self.breaker.failures == 1:
                log.warning("usage stream unavailable (%s): records go to the local spool", type(exc).__name__)
            return False
        self.breaker.success()
        return True

    async def watch_bounds_forever(self, interval: float = 1.0) -> None:
        """Keep the backlog figures current and refuse new work while the buffer is at its bound."""
        while True:
            if self.redis is not None:
                try:
                    async with asyncio.timeout(self.timeout):
                        self.stream_backlog = int(await self.redis.xlen(STREAM))
                except (RedisError, OSError, TimeoutError) as exc:
                    reraise_cancellation(exc)
            self.spool_bytes = await asyncio.to_thread(self.spool.pending_bytes)
            full = self.stream_backlog >= self.max_backlog or self.spool_bytes >= self.max_spool_bytes
            if full != self.full:
                log.error("usage buffer %s", "full: refusing new requests" if full else "below its bound again")
            self.full = full
            metrics.USAGE_BACKLOG.set(self.stream_backlog)
            metrics.USAGE_SPOOL_BYTES.set(self.spool_bytes)
            await asyncio.sleep(interval)


async def check_redis_durability(client: aioredis.Redis) -> None:
    """A production Redis must persist (AOF) and must not evict: it holds the usage buffer and the budgets."""
    try:
        appendonly = (await client.config_get("appendonly")).get("appendonly")
        policy = (await client.config_get("maxmemory-policy")).get("maxmemory-policy")
    except (RedisError, OSError) as exc:
        log.warning(
            "could not verify Redis persistence settings (%s): make sure appendonly is yes and "
            "maxmemory-policy is noeviction",
            type(exc).__name__,
        )
        return
    if appendonly != "yes":
        log.warning(
            "REDIS DOES NOT PERSIST (appendonly=%s): a Redis restart loses buffered usage records that the "
            "ledger writer has not inserted yet. Set appendonly yes.",
            appendonly,
        )
    if policy != "noeviction":
        log.warning(
            "REDIS MAY EVICT KEYS (maxmemory-policy=%s): buffered usage records and budgets can be lost. "
            "Set maxmemory-policy noeviction.",
            policy,
        )
