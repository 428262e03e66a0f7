"""Limits stage: admission before forwarding, settlement after. The interface every limiter implements.

`admit` runs before the request is forwarded and may raise `RateLimited`/`QuotaExceeded`; `settle_calls` gives,
in the request's shielded finalisation, what settling against the real usage takes (the ledger buffer runs it in
the same round trip as the usage record); `headers` gives the `x-ratelimit-*` headers for the response.
`QuotaLimiter` (limiter.py) is the implementation, over Redis or the in-process store; `NoLimits` is for tests.
"""

from __future__ import annotations

from typing import Protocol

from gateway.context import RequestContext
from gateway.limits.store import SettleCall


class Limiter(Protocol):
    store_status: str

    async def admit(self, ctx: RequestContext) -> None: ...

    def settle_calls(self, ctx: RequestContext) -> list[SettleCall]: ...

    def headers(self, ctx: RequestContext) -> dict[str, str] | None: ...


class NoLimits:
    store_status = "not configured"

    async def admit(self, ctx: RequestContext) -> None:
        return None

    def settle_calls(self, ctx: RequestContext) -> list[SettleCall]:
        return []

    def headers(self, ctx: RequestContext) -> dict[str, str] | None:
        return None
