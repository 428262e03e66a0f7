"""Limits stage: admission before forwarding, settlement after. The interface every limiter implements.

`admit` runs before the request is forwarded and may raise `RateLimited`/`QuotaExceeded`; `settle` runs in the
request's shielded finalisation with the real usage; `headers` gives the `x-ratelimit-*` headers for the
response. The foundation ships `NoLimits`; the Redis and in-process limiters plug in here.
"""

from __future__ import annotations

from typing import Protocol

from gateway.context import RequestContext


class Limiter(Protocol):
    store_status: str

    async def admit(self, ctx: RequestContext) -> None: ...

    async def settle(self, ctx: RequestContext) -> None: ...

    def headers(self, ctx: RequestContext) -> dict[str, str] | None: ...


class NoLimits:
    store_status = "not configured"

    async def admit(self, ctx: RequestContext) -> None:
        return None

    async def settle(self, ctx: RequestContext) -> None:
        return None

    def headers(self, ctx: RequestContext) -> dict[str, str] | None:
        return None
