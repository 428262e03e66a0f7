"""Dispatch: choose an endpoint, hold a slot, relay; on failure before the first byte, try elsewhere.

Connection failures, timeouts and upstream 429/5xx are retried on another endpoint, only while nothing has gone
to the client (a stream is never retried once it began), within the model's attempt count and total deadline.
An upstream's `retry-after` is honoured by keeping that endpoint out of rotation for as long as it asks; when no
other endpoint can take the request, the 429 and its `retry-after` go to the client, whose SDK waits and retries.
Then the model's fallbacks
are tried, in order, but only those the caller's key may use. Limits stay charged against the requested model;
cost is priced at the deployment that served. A group name resolves to its members (cheapest healthy first, or
least loaded), the rest being its fallbacks.

Invariant: an endpoint's `outstanding` count and its deployment slot are held exactly while an attempt runs.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from gateway import metrics
from gateway.context import RequestContext
from gateway.errors import (
    GatewayError,
    RateLimited,
    ServiceUnavailable,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from gateway.metering.prices import PriceBook
from gateway.relay.body import upstream_body
from gateway.relay.forward import forward
from gateway.relay.stream import stream
from gateway.routing.choice import affinity_key, choose, score
from gateway.routing.slots import DeploymentSlots, FairQueue, QueueFull
from gateway.routing.table import Endpoint, GroupRoute, ModelRoute, RouteTable
from gateway.tally import TALLY
from gateway.upstream.pool import UpstreamPool
from gateway.validation import UPSTREAM_PATHS, Call

Finish = Callable[[RequestContext], Awaitable[None]]


def retryable(error: GatewayError) -> bool:
    if isinstance(error, UpstreamUnreachable | UpstreamTimeout):
        return True
    return isinstance(error, UpstreamError) and (error.status == 429 or error.status >= 500)


def retry_after_seconds(error: GatewayError) -> float | None:
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        value = error.headers.get(name)
        if value is not None:
            try:
                return max(0.0, float(value) * scale)
            except ValueError:
                return None
    return None


def unavailable(plan: list[ModelRoute], model: str) -> GatewayError:
    """Why nothing could be tried: every endpoint draining (503), cooling down after a 429 (429), or known to be
    down: failing health checks or an open breaker (502)."""
    endpoints = [endpoint for route in plan for endpoint in route.endpoints()]
    now = time.monotonic()
    if endpoints and all(endpoint.deployment.draining for endpoint in endpoints):
        return ServiceUnavailable(
            f"Every deployment of model '{model}' is being drained.", headers={"retry-after": "5"}
        )
    cooling = [endpoint.cooldown_until - now for endpoint in endpoints if endpoint.cooldown_until > now]
    if cooling:
        wait = max(0.001, min(cooling))
        return RateLimited(
            f"The upstreams of model '{model}' asked to slow down; please retry shortly.",
            headers={"retry-after": str(max(1, round(wait + 0.5))), "retry-after-ms": str(int(wait * 1000))},
        )
    return UpstreamUnreachable(f"No healthy upstream is serving model '{model}' right now.")


class Dispatcher:
    def __init__(
        self,
        routes: Callable[[], RouteTable],
        pool: UpstreamPool,
        slots: DeploymentSlots,
        prices: Callable[[], PriceBook],
        priorities: Callable[[], dict[str, int]],
    ) -> None:
        self._routes = routes
        self._pool = pool
        self.slots = slots
        self._prices = prices
        self._priorities = priorities
        self._queues: dict[str, FairQueue] = {}
        self._tickers: dict[str, asyncio.Task[None]] = {}
        self._tiebreak = itertools.count()

    # --- planning ---

    def plan(self, route: ModelRoute | GroupRoute, may_use: Callable[[str], bool]) -> list[ModelRoute]:
        """The models to try, in order: the requested one (or a group's members) then allowed fallbacks."""
        table = self._routes()
        if isinstance(route, GroupRoute):
            members = [table.models[name] for name in route.group.models]
            members.sort(key=self._group_order(route))
            first, rest = members[0], members[1:]
        else:
            first, rest = route, [table.models[name] for name in route.fallbacks if may_use(name)]
        plan = [first]
        for candidate in rest:
            if candidate not in plan:
                plan.append(candidate)
        return plan

    def _group_order(self, route: GroupRoute) -> Callable[[ModelRoute], tuple[float, float]]:
        now, book = time.monotonic(), self._prices()

        def available(member: ModelRoute) -> float:
            return 0.0 if any(endpoint.available(now) for endpoint in member.endpoints()) else 1.0

        def price(member: ModelRoute) -> float:
            found = [book.lookup(member.name, deployment.name, time.time()) for deployment in member.deployments]
            known = [entry.prompt + entry.completion for entry in found if entry is not None]
            return min(known) if known else float("inf")

        def load(member: ModelRoute) -> float:
            return min((score(endpoint) for endpoint in member.endpoints()), default=float("inf"))

        if route.group.strategy == "cheapest":
            return lambda member: (available(member), price(member))
        return lambda member: (available(member), load(member))

    # --- dispatching ---

    async def dispatch(
        self,
        request: web.Request,
        ctx: RequestContext,
        call: Call,
        raw: bytes,
        plan: list[ModelRoute],
        headers: dict[str, str],
        finish: Finish,
    ) -> web.StreamResponse:
        deadline = time.monotonic() + plan[0].retry.deadline
        last_error: GatewayError | None = None
        for model_route in plan:
            tried: set[Endpoint] = set()
            for _attempt in range(model_route.retry.attempts):
                if time.monotonic() >= deadline:
                    break
                endpoint = await self._acquire(model_route, ctx, tried, deadline)
                if endpoint is None:
                    break
                tried.add(endpoint)
                try:
                    return await self._attempt(request, ctx, call, raw, endpoint, headers, finish)
                except GatewayError as exc:
                    if not retryable(exc):
                        raise
                    last_error = exc
                    self._penalise(endpoint, exc)
        if last_error is not None:
            raise last_error
        raise unavailable(plan, ctx.model)

    async def _attempt(
        self,
        request: web.Request,
        ctx: RequestContext,
        call: Call,
        raw: bytes,
        endpoint: Endpoint,
        headers: dict[str, str],
        finish: Finish,
    ) -> web.StreamResponse:
        deployment = endpoint.deployment
        ctx.deployment = deployment
        ctx.status, ctx.error_type = 0, None
        body = upstream_body(raw, call, deployment, ctx.max_tokens_granted)
        path = UPSTREAM_PATHS[ctx.endpoint]
        endpoint.outstanding += 1
        endpoint.sent_since_scrape += 1
        started = time.perf_counter()
        try:
            if deployment.config.kind != "vllm":
                await ctx.admitted()  # a provider may bill a request cancelled after a refusal: none goes early
            if call.stream:
                TALLY.level(metrics.STREAMS_IN_FLIGHT, (), 1)
                try:
                    response = await ctx.unless_refused(
                        stream(request, self._pool, ctx, endpoint, path, body, finish, headers)
                    )
                finally:
                    TALLY.level(metrics.STREAMS_IN_FLIGHT, (), -1)
            else:
                payload = await ctx.unless_refused(forward(self._pool, ctx, endpoint, path, body))
                await ctx.admitted()
                ctx.status = 200
                await finish(ctx)
                response = web.Response(body=payload, content_type="application/json", headers=headers)
        except GatewayError:
            await ctx.admitted()  # refused meanwhile: the refusal, not retried, rather than the upstream's error
            raise
        else:
            if ctx.status < 500:
                endpoint.breaker.success()
            else:  # a stream that broke after it began: not retried, but it counts against the endpoint
                self._penalise(endpoint, None)
            return response
        finally:
            endpoint.outstanding -= 1
            ctx.upstream_seconds += time.perf_counter() - started
            await self._release(endpoint, ctx)

    def _penalise(self, endpoint: Endpoint, error: GatewayError | None) -> None:
        kind = "stream"
        if isinstance(error, UpstreamError) and error.status == 429:
            # Overloaded, not broken: stay away for as long as it asks (1 s if it does not say).
            endpoint.cooldown_until = time.monotonic() + (retry_after_seconds(error) or 1.0)
            metrics.UPSTREAM_ERRORS.labels(endpoint.deployment.name, "status").inc()
            return
        if isinstance(error, UpstreamTimeout):
            kind = "timeout"
        elif isinstance(error, UpstreamUnreachable):
            kind = "unreachable"
        elif isinstance(error, UpstreamError):
            kind = "status"
        endpoint.breaker.failure()
        metrics.UPSTREAM_ERRORS.labels(endpoint.deployment.name, kind).inc()

    # --- slots and the queue ---

    async def _acquire(
        self, route: ModelRoute, ctx: RequestContext, tried: set[Endpoint], deadline: float
    ) -> Endpoint | None:
        affinity = affinity_key(route.affinity, ctx.payload or {}) if route.affinity != "none" else None
        queued_at: float | None = None
        member = ctx.request_id_text
        queue = self._queues.get(route.name)
        if queue is not None and queue.size:
            # Others are already waiting for this model: a newcomer queues behind them (in its team's turn)
            # instead of taking a slot that has just been freed for the next waiter.
            queued_at = time.monotonic()
            await self._wait_for_slot(route, ctx, False, queued_at, deadline)
        while True:
            full: set[Endpoint] = set()
            candidates = [endpoint for endpoint in route.endpoints() if endpoint not in tried]
            while True:
                endpoint = choose(
                    [candidate for candidate in candidates if candidate not in full],
                    now=time.monotonic(),
                    tiebreak=next(self._tiebreak),
                    affinity_key=affinity,
                )
                if endpoint is None:
                    break
                if not endpoint.breaker.allow():
                    full.add(endpoint)
                    continue
                if await self.slots.try_acquire(endpoint.deployment, member):
                    if queued_at is not None:
                        ctx.queue_ms = (time.monotonic() - queued_at) * 1000
                        metrics.QUEUE_SECONDS.labels(route.name).observe(ctx.queue_ms / 1000)
                    return endpoint
                full.update(endpoint.deployment.endpoints)
            if not full:
                return None  # nothing usable at all: breakers open, draining, cooling down
            await self._wait_for_slot(route, ctx, queued_at is not None, queued_at or time.monotonic(), deadline)
            queued_at = queued_at or time.monotonic()

    async def _wait_for_slot(
        self, route: ModelRoute, ctx: RequestContext, requeue: bool, queued_at: float, deadline: float
    ) -> None:
        """Wait in the model's fair queue until woken (a slot was freed, or the tick) or the wait runs out."""
        queue = self._queues.setdefault(route.name, FairQueue(route.queue.max_waiting))
        team = ctx.key.team_name if ctx.key else ""
        remaining = min(queued_at + route.queue.timeout, deadline) - time.monotonic()
        try:
            if remaining <= 0:
                raise TimeoutError
            future = queue.enqueue(team, self._priorities().get(team, 0), front=requeue)
        except (QueueFull, TimeoutError):
            metrics.QUEUE_REJECTED.labels(route.name).inc()
            raise RateLimited(
                f"Every deployment of model '{route.name}' is at capacity; please retry shortly.",
                headers={"retry-after": "1", "retry-after-ms": "1000"},
            ) from None
        self._ensure_ticker(route.name, queue)
        try:
            async with asyncio.timeout(remaining):
                await future
        except TimeoutError:
            queue.remove(future)
            metrics.QUEUE_REJECTED.labels(route.name).inc()
            raise RateLimited(
                f"Every deployment of model '{route.name}' stayed at capacity; please retry shortly.",
                headers={"retry-after": "1", "retry-after-ms": "1000"},
            ) from None
        except asyncio.CancelledError:
            queue.remove(future)
            raise

    def _ensure_ticker(self, name: str, queue: FairQueue) -> None:
        """Slots freed by other processes (or breakers closing) wake nobody here: a tick wakes the head waiter."""
        if name in self._tickers:
            return

        async def tick() -> None:
            try:
                while queue.size:
                    await asyncio.sleep(0.1)
                    queue.wake_next()
            finally:
                self._tickers.pop(name, None)

        self._tickers[name] = asyncio.create_task(tick(), name=f"queue-tick-{name}")

    async def _release(self, endpoint: Endpoint, ctx: RequestContext) -> None:
        await self.slots.release(endpoint.deployment, ctx.request_id_text)
        queue = self._queues.get(endpoint.deployment.model)
        if queue is not None and queue.size:
            queue.wake_next()

    def queue_depth(self, model: str) -> int:
        queue = self._queues.get(model)
        return queue.size if queue is not None else 0
