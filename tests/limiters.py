"""Gateway workers' quota limiters over one real Redis, for the limiter's unit tests (test_grants.py,
test_overlap.py): each with its own connection and grants, admitting and settling as the proxy does."""

from __future__ import annotations

import random
import time
import uuid

from gateway.auth.store import KeyRecord
from gateway.context import RequestContext
from gateway.limits.checks import Periods
from gateway.limits.grants import Grants
from gateway.limits.limiter import QuotaLimiter
from gateway.limits.redis_store import RedisStore
from gateway.metering.cost import Price
from gateway.metering.prices import PriceBook
from gateway.redis_client import make_redis
from gateway.settings import Limits
from gateway.snapshot import Snapshot
from tests.harness import key_record

PROMPT = 10  # every request's estimated prompt
PRICE = Price(prompt=2 * 10**9, completion=6 * 10**9, cached_prompt=10**9)  # nano-USD per million tokens
SNAPSHOT = Snapshot(version=1, keys={}, prices=PriceBook({}), overrides={}, drains=frozenset(), loaded_at=0.0)


class Clock:
    """The grants' monotonic clock, moved by the test (Redis keeps its own, real one)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Workers:
    """Gateway workers' limiters sharing one Redis, each with its own grants and connection."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.limiters: list[QuotaLimiter] = []
        self.clients: list[object] = []

    def add(
        self,
        limits: Limits,
        *,
        grants: bool = True,
        clock: Clock | None = None,
        wall: Clock | None = None,
        price: Price | None = PRICE,
    ) -> QuotaLimiter:
        client = make_redis(self.url, timeout=1.0)
        self.clients.append(client)

        async def no_rebuild(slot: str, periods: Periods, now_ms: int) -> list[tuple[str, int, int]]:
            return []

        limiter = QuotaLimiter(
            RedisStore(client, url=self.url),
            limits,
            snapshot=lambda: SNAPSHOT,
            estimate_prompt=lambda endpoint, payload: PROMPT,
            model_price=lambda model: price,
            rebuild_source=no_rebuild,
            fail_open=False,
            timeout=1.0,
            grants=Grants(clock or time.monotonic, wall or time.time) if grants else None,
        )
        self.limiters.append(limiter)
        return limiter

    async def close(self) -> None:
        for limiter in self.limiters:
            await limiter.close()
            assert isinstance(limiter.store, RedisStore)
            limiter.store.pipeliner.close()
        for client in self.clients:
            await client.aclose()  # type: ignore[attr-defined]


def team_key(team_id: int) -> KeyRecord:
    return key_record(f"key{team_id}", team_id, f"team{team_id}")


def new_team() -> KeyRecord:
    return team_key(random.randrange(10**9))


async def admit(limiter: QuotaLimiter, key: KeyRecord, max_tokens: int = 20) -> RequestContext:
    ctx = RequestContext.begin(uuid.uuid4(), "chat")
    ctx.key, ctx.model, ctx.payload, ctx.max_tokens = key, "chat-small", {"messages": []}, max_tokens
    await limiter.admit(ctx)
    return ctx


async def finish(
    limiter: QuotaLimiter, ctx: RequestContext, completion: int, price: Price | None = PRICE
) -> tuple[int, int]:
    """Settle as the ledger does (the calls run in Redis); returns the tokens and nano-USD used."""
    ctx.usage.prompt_tokens, ctx.usage.completion_tokens = PROMPT, completion
    ctx.cost_nanousd = (PROMPT * price.prompt + completion * price.completion) // 1_000_000 if price else 0
    calls = limiter.settle_calls(ctx)
    if calls:
        await limiter.store.settle(calls)
    return PROMPT + completion, ctx.cost_nanousd
