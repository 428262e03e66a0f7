"""The quota limiter: reserve before forwarding, settle against real usage after.

Admission reserves the request's estimated prompt tokens plus its `max_tokens` (or `limits.default_max_tokens`)
in every scope that applies, in one atomic step per hash slot (the team's; the model's organisation-wide cap, if
any, is a second call in the same pipeline, refunded if the first refuses): one round trip. Settlement, in the
request's shielded finalisation, gives back what was not used or charges the excess as debt, and releases the
concurrency lease, in the round trip that makes the usage record durable.

Over Redis, an admission may also reserve grants (grants.py): room for the worker's next requests of the same
scopes, which are then admitted and settled in the worker, without a round trip of their own.

When the store (Redis) is slow or down: a short timeout, then the configured mode: fail-closed (503) or
fail-open (admit, counted in a metric); a breaker skips the store while it is known to be down, and recovery is
automatic.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import NamedTuple, TypeVar

from redis.exceptions import RedisError

from gateway import metrics
from gateway.breaker import BreakerState, CircuitBreaker
from gateway.context import RequestContext
from gateway.errors import GatewayError, QuotaExceeded, RateLimited, ServiceUnavailable
from gateway.limits.checks import Check, Periods, Window, build_checks, marker_key, slot_of, with_amounts
from gateway.limits.grants import SWEEPS_PER_SECOND, Grant, Grants, Taken
from gateway.limits.headers import add_window_headers, duration, retry_headers, window_headers
from gateway.limits.policy import RequestScopes, resolve
from gateway.limits.store import AdmitCall, AdmitResult, LimitStore, LocalStore, SettleCall
from gateway.metering.cost import Price, TokenCounts, cost_nanousd
from gateway.redis_client import reraise_cancellation
from gateway.settings import Limits
from gateway.snapshot import Snapshot
from gateway.tally import TALLY

log = logging.getLogger(__name__)

T = TypeVar("T")
RebuildSource = Callable[[str, Periods, int], Awaitable[list[tuple[str, int, int]]]]

_METRIC_TEXT = {
    "requests": "requests per {window}",
    "tokens": "tokens per {window}",
    "concurrency": "concurrent requests",
    "daily_tokens": "daily token budget",
    "monthly_tokens": "monthly token budget",
    "daily_cost": "daily spend budget (nano-USD)",
    "monthly_cost": "monthly spend budget (nano-USD)",
}
# Renewals go a few scopes per round trip, so that a request's own trip never queues long behind them in Redis;
# more when the last trip was slow: that trip waited for a busy event loop, not for Redis (~30-40 µs per scope),
# so the next may carry one scope per RENEWAL_TRIP_SHARE seconds of it. A period's renewals then land within
# ~0.1 s of its start at any load (8 per trip on a loaded worker, each trip a turn of its loop, took ~0.9 s
# for 1,000 scopes: a busy key's requests went to Redis meanwhile).
RENEWALS_PER_TRIP = 8
MAX_RENEWALS_PER_TRIP = 256
RENEWAL_TRIP_SHARE = 100e-6
_IN_WORKER, _PARTLY_IN_WORKER, _IN_STORE = ("worker",), ("partial",), ("store",)
_UNSENT = ("unavailable",)  # renewals not made: Redis failed or was known to be down (the breaker)
_UNCHARGED = frozenset({"concurrency", "marker"})  # settlement charges nothing to these (the lease is released)
_BUDGETS = frozenset({"daily_tokens", "monthly_tokens", "daily_cost", "monthly_cost"})
# Overlapping admission (`overlaps`): scopes count as having room to spare for this long after an admission that
# left at least 1/_ROOMY_SHARE of every limit.
ROOMY_SECONDS = 60.0
_ROOMY_SHARE = 4
Templates = list[list[Check]]


class _Demand(NamedTuple):
    prompt: int
    completion: int
    tokens: int  # prompt + completion
    cost: int
    clamp: int  # the completion tokens clamping may lower, 0 without clamping


def renewals_per_trip(last_trip_seconds: float) -> int:
    return min(max(RENEWALS_PER_TRIP, int(last_trip_seconds / RENEWAL_TRIP_SHARE)), MAX_RENEWALS_PER_TRIP)


def _grant_headers(taken: Taken) -> dict[str, str]:
    """The x-ratelimit headers of a request admitted from grants: the tightest sliding window of each kind, as the
    store counted it at the grant's reservation plus what the worker has taken from it since. (Budgets are granted
    only while hard, so never over their limit: no warning to give.)"""
    requests: tuple[Check, int] | None = None
    tokens: tuple[Check, int] | None = None
    for grant, check, _ in taken:
        if grant is None or check.kind != "sw":
            continue
        remaining = check.limit - grant.usage + grant.remaining
        if check.tokens:
            if tokens is None or remaining < tokens[1]:
                tokens = (check, remaining)
        elif requests is None or remaining < requests[1]:
            requests = (check, remaining)
    headers: dict[str, str] = {}
    for kind, tightest in (("requests", requests), ("tokens", tokens)):
        if tightest is not None:
            check, remaining = tightest
            add_window_headers(headers, kind, check.limit, remaining, check.p1 + check.p2)
    return headers


class StoreUnavailable(Exception):
    """The limit store did not answer in time or failed."""


@dataclass(slots=True)
class Reservation:
    calls: list[AdmitCall]
    admitted_ms: int
    tokens: int  # per token check, as reserved (clamping may have lowered it)
    cost: int
    headers: dict[str, str] = field(default_factory=dict)
    reserved: bool = True  # False: admitted without the store (fail-open); settle charges what it can
    taken: Taken | None = None  # admitted in the worker, from these grants


def _reserved_amount(check: Check, call: AdmitCall, result: AdmitResult) -> int:
    if check.tokens and result.granted:
        return call.prompt_estimate + result.granted
    return check.amount


class QuotaLimiter:
    def __init__(
        self,
        store: LimitStore,
        limits: Limits,
        *,
        snapshot: Callable[[], Snapshot],
        estimate_prompt: Callable[[str, dict[str, object]], int],
        model_price: Callable[[str], Price | None],
        rebuild_source: RebuildSource,
        fail_open: bool,
        timeout: float,
        grants: Grants | None = None,
    ) -> None:
        self.store = store
        self.limits = limits
        self._snapshot = snapshot
        self._estimate_prompt = estimate_prompt
        self._model_price = model_price
        self._rebuild_source = rebuild_source
        self.fail_open = fail_open
        self.timeout = timeout
        self.grants = grants
        self.store_healthy = True
        self.breaker = CircuitBreaker(threshold=3, cooldown=1.0)
        self._scope_cache: dict[tuple[str, str], RequestScopes] = {}
        # Check templates per scopes, for the current UTC day: keys and limits are the same for every request of a
        # key and model until the snapshot or the day changes; only the amounts differ.
        self._templates: dict[int, list[list[Check]]] = {}
        self._templates_day = 0
        # Equal scopes and checks are one object: a key's scopes are usually the same for every model, and a team's
        # checks the same for every key, so the caches grow with keys, not keys x models x checks.
        self._shared_scopes: dict[object, object] = {}
        self._shared_checks: dict[object, Check] = {}
        self.reconfigure(limits)
        self._leases: dict[str, list[tuple[str, str]]] = {}  # request id -> concurrency (key, member) held
        self._roomy: dict[int, float] = {}  # id(scopes) -> until when they had room to spare (monotonic)
        self._renewal_trip_seconds = 0.0  # how long the last renewal round trip took

    def reconfigure(self, limits: Limits) -> None:
        """New default limits (config reload): applied to the next request."""
        self.limits = limits
        self._window = Window(
            window_ms=int(limits.window_seconds * 1000),
            bucket_ms=max(1, int(limits.window_seconds * 1000 / limits.buckets_per_window)),
        )
        self._lease_ms = int(limits.lease_seconds * 1000)
        # Only a round trip is worth overlapping: the in-process store answers at once.
        self._may_overlap = (
            limits.overlap_admission and not limits.clamp_max_tokens and not isinstance(self.store, LocalStore)
        )
        self._scope_cache.clear()
        self._scope_version = -1

    # --- admission ---------------------------------------------------------------------------------------

    def _scopes(self, ctx: RequestContext) -> RequestScopes:
        snapshot = self._snapshot()
        if snapshot.version != self._scope_version:
            self._scope_cache.clear()
            self._templates.clear()
            self._shared_scopes.clear()
            self._shared_checks.clear()
            self._roomy.clear()
            self._scope_version = snapshot.version
            if self.grants is not None:
                self.grants.expire_all()  # limits may have changed: grants go back, the next ones use the new
        assert ctx.key is not None
        cache_key = (ctx.key.key_id, ctx.model)
        scopes = self._scope_cache.get(cache_key)
        if scopes is None:
            resolved = resolve(self.limits, snapshot.overrides, ctx.key, ctx.model)
            scopes = self._share(
                RequestScopes(
                    team_slot=tuple(self._share(scope) for scope in resolved.team_slot),
                    model_slot=tuple(self._share(scope) for scope in resolved.model_slot),
                )
            )
            self._scope_cache[cache_key] = scopes
        return scopes

    def _share(self, value: T) -> T:
        """The one equal scope object already held, or this one."""
        return self._shared_scopes.setdefault(value, value)  # type: ignore[return-value]

    def _shared_check(self, check: Check) -> Check:
        identity = (check.kind, check.key, check.limit, check.amount, check.p1, check.p2, check.tokens, check.metric)
        return self._shared_checks.setdefault((identity, check.scope), check)

    async def admit(self, ctx: RequestContext) -> None:
        """Admit the request or raise its refusal."""
        remote = self.begin(ctx)
        if remote is not None:
            await remote

    def begin(self, ctx: RequestContext) -> Coroutine[None, None, None] | None:
        """The part of admission that needs no I/O: refusals the store is not needed for, and admission from the
        worker's grants. Returns the store's part, still to be awaited, or None when the request is admitted."""
        scopes = self._scopes(ctx)
        if scopes.empty:
            return None
        payload = ctx.payload or {}
        prompt = self._estimate_prompt(ctx.endpoint, payload)
        completion = 0 if ctx.endpoint == "embeddings" else ctx.max_tokens
        if completion is None:
            completion = self.limits.default_max_tokens
        tokens = prompt + completion
        price = self._model_price(ctx.model)
        cost = cost_nanousd(TokenCounts(prompt=prompt, completion=completion), price) if price else 0
        clamp = completion if self.limits.clamp_max_tokens and ctx.endpoint != "embeddings" else 0
        self._refuse_impossible(scopes, prompt, tokens, clamp)
        demand = _Demand(prompt, completion, tokens, cost, clamp)

        now_ms = int(time.time() * 1000)
        templates = remote = self._templates_for(scopes, Periods.at(now_ms), now_ms)
        local: Taken = []
        grants = self.grants
        if grants is not None:
            if clamp:  # the store may lower the reservation after the fact: all of it or none of it from grants
                if (taken := grants.admit(templates, tokens, cost)) is not None:
                    self._reserved_locally(ctx, taken, tokens, cost, now_ms)
                    self._keep_room(scopes)
                    TALLY.count(metrics.LIMIT_ADMISSIONS, _IN_WORKER)
                    return None
            else:
                local, remote = grants.admit_covered(templates, tokens, cost)
                if not remote:
                    self._reserved_locally(ctx, local, tokens, cost, now_ms)
                    self._keep_room(scopes)
                    TALLY.count(metrics.LIMIT_ADMISSIONS, _IN_WORKER)
                    return None
        return self._admit_remote(ctx, scopes, demand, now_ms, local, remote)

    def overlaps(self, ctx: RequestContext) -> bool:
        """Whether the store's part of this request's admission may run while the request is already upstream:
        only for scopes whose last admission here, moments ago, left a good part of every limit, so that a
        refusal (which throws the upstream's work away) stays rare. Never with clamping: the upstream body waits
        for the clamped max_tokens."""
        if not self._may_overlap:
            return False
        assert ctx.key is not None
        scopes = self._scope_cache.get((ctx.key.key_id, ctx.model))
        until = self._roomy.get(id(scopes)) if scopes is not None else None
        return until is not None and until > time.monotonic()

    async def _admit_remote(
        self, ctx: RequestContext, scopes: RequestScopes, demand: _Demand, now_ms: int, local: Taken, remote: Templates
    ) -> None:
        try:
            await self._admit_through_store(ctx, scopes, demand, now_ms, local, remote)
        except GatewayError:
            self._roomy.pop(id(scopes), None)
            raise

    async def _admit_through_store(
        self, ctx: RequestContext, scopes: RequestScopes, demand: _Demand, now_ms: int, local: Taken, remote: Templates
    ) -> None:
        prompt, completion, tokens, cost, clamp = demand
        grants = self.grants
        extras = True
        for attempt in range(4):
            periods = Periods.at(now_ms)
            templates = self._templates_for(scopes, periods, now_ms)
            if attempt:  # a new period or rebuilt budgets: all of it from the store, without grants
                local, remote = [], templates
            request_id = ctx.request_id_text
            calls = sent = self._calls(remote, tokens, cost, request_id, periods, clamp, prompt)
            expired: list[Grant] = []
            if grants is not None:
                sent, expired = grants.with_grants(calls, extras=extras, each=not clamp)
            try:
                # Expired grants go back first, in the same round trip: this admission sees the room they held.
                returning = Grants.returns(expired) if expired else None
                results = await self._guarded(partial(self.store.admit, sent, returning))
            except StoreUnavailable:
                await self._untake(local, tokens, cost, request_id)
                if local:
                    calls = self._calls(templates, tokens, cost, request_id, periods, clamp, prompt)
                self._store_down(ctx, calls, tokens, cost)
                return
            if local and any(result.code != AdmitResult.ADMITTED for result in results):
                await self._untake(local, tokens, cost, request_id)  # the store's part failed: all of it did
            if any(result.code == AdmitResult.PERIOD_MISMATCH for result in results):
                now_ms = max(result.now_ms for result in results)
                await self._undo(sent, results)
                continue
            rebuild = [
                call for call, result in zip(calls, results, strict=True) if result.code == AdmitResult.NEEDS_REBUILD
            ]
            if rebuild:
                await self._undo(sent, results)
                await self._rebuild(rebuild, periods, now_ms)
                continue
            refused = [index for index, result in enumerate(results) if result.code == AdmitResult.REFUSED]
            if refused:
                await self._undo(sent, results)
                call, result = calls[refused[0]], results[refused[0]]
                if grants is not None:
                    if sent[refused[0]].checks[result.failed].amount != call.checks[result.failed].amount:
                        extras = False  # the room asked for a grant may be what did not fit: ask for none
                        continue
                    if await self._give_back(call.checks[result.failed].key):
                        continue  # this worker's own grant held the room: now without it
                self._raise_refusal(call, result, tokens)
            taken = grants.take(sent, calls, results, ctx.request_id_text) + local if grants is not None else None
            usage = self._reserved(ctx, calls, results, tokens, cost, completion, taken, local)
            self._note_room(scopes, usage)
            TALLY.count(metrics.LIMIT_ADMISSIONS, _PARTLY_IN_WORKER if local else _IN_STORE)
            return
        raise ServiceUnavailable(
            "The rate limiter could not decide in time; please retry.", headers={"retry-after": "1"}
        )

    def _keep_room(self, scopes: RequestScopes) -> None:
        """Admitted from grants, which are only reserved while a limit has ample room: scopes that had room to spare
        at their last admission through the store keep that mark while their keys are busy (refreshed now and then,
        not per request), so that their next admission through the store may overlap too."""
        until = self._roomy.get(id(scopes))
        if until is not None:
            now = time.monotonic()
            if until - now < ROOMY_SECONDS / 2:
                self._roomy[id(scopes)] = now + ROOMY_SECONDS

    def _note_room(self, scopes: RequestScopes, usage: list[tuple[Check, int]]) -> None:
        """Remember whether these scopes had room to spare after this admission (see `overlaps`)."""
        if not self._may_overlap:
            return
        if all(check.kind == "mk" or (check.limit - value) * _ROOMY_SHARE >= check.limit for check, value in usage):
            self._roomy[id(scopes)] = time.monotonic() + ROOMY_SECONDS
        else:
            self._roomy.pop(id(scopes), None)

    @staticmethod
    def _calls(
        templates: list[list[Check]], tokens: int, cost: int, request_id: str, periods: Periods, clamp: int, prompt: int
    ) -> list[AdmitCall]:
        return [AdmitCall(with_amounts(slot, tokens, cost), request_id, periods, clamp, prompt) for slot in templates]

    def _templates_for(self, scopes: RequestScopes, periods: Periods, now_ms: int) -> list[list[Check]]:
        """The checks of these scopes per hash slot, amounts left out (a request's own are `with_amounts`)."""
        if periods.day_start != self._templates_day:
            self._templates.clear()  # yesterday's budget keys
            self._shared_checks.clear()
            self._templates_day = periods.day_start
        # Scope objects live as long as the snapshot version, and the cache is cleared with them: id() is stable.
        templates = self._templates.get(id(scopes))
        if templates is None:
            templates = self._templates[id(scopes)] = [
                [self._shared_check(check) for check in checks]
                for slot_scopes in (scopes.team_slot, scopes.model_slot)
                if slot_scopes
                and (
                    checks := build_checks(
                        slot_scopes,
                        tokens=0,
                        cost_nanousd=0,
                        window=self._window,
                        lease_ms=self._lease_ms,
                        periods=periods,
                        now_ms=now_ms,
                        with_marker=True,
                    )
                )
            ]
        return templates

    def _refuse_impossible(self, scopes: RequestScopes, prompt: int, tokens: int, clamp: int) -> None:
        """A request bigger than a token limit itself would wait forever: say so at once, and don't retry."""
        need = prompt + 1 if clamp else tokens
        scope = scopes.tightest_tpm
        if scope is not None and scope.tpm is not None and need > scope.tpm:
            raise RateLimited(
                f"This request needs {need} tokens, more than the {scope.scope} '{scope.subject}' limit of "
                f"{scope.tpm} tokens per {duration(self._window.window_ms)}; lower max_tokens or the prompt.",
                param="max_tokens",
                headers={"x-should-retry": "false"},
            )

    async def _guarded(self, operation: Callable[[], Awaitable[T]]) -> T:
        """Run a store operation through the breaker; failures become StoreUnavailable. The store bounds its own
        calls (RedisStore: the shared pipeline's timeout, redis-py's socket timeouts), so no timer per request."""
        if not self.breaker.allow():
            raise StoreUnavailable("breaker open")
        try:
            result = await operation()
        except (RedisError, OSError, TimeoutError) as exc:
            reraise_cancellation(exc)  # a client that hung up meanwhile is gone: no fail-open admission, no 503
            self.breaker.failure()
            metrics.LIMITER_STORE_ERRORS.inc()
            if self.breaker.failures == 1:  # the first of a series is enough in the log (its text names the host)
                log.warning("limit store call failed: %s", type(exc).__name__)
            raise StoreUnavailable(type(exc).__name__) from exc
        self.breaker.success()
        return result

    def _store_down(self, ctx: RequestContext, calls: list[AdmitCall], tokens: int, cost: int) -> None:
        if not self.fail_open:
            metrics.RATE_LIMITED.labels("limiter", "unavailable").inc()
            raise ServiceUnavailable(
                "Rate limiting is temporarily unavailable, so requests are refused (fail-closed). Retry shortly.",
                headers={"retry-after": "1"},
            )
        metrics.LIMITER_FAIL_OPEN.inc()
        if self.breaker.failures == 1:  # once per outage; the metric counts every request
            log.warning(
                "limit store unavailable: admitting without limits (fail-open)",
                extra={"request_id": ctx.request_id_text},
            )
        ctx.reservation = Reservation(calls, int(time.time() * 1000), tokens, cost, reserved=False)

    async def _undo(self, calls: list[AdmitCall], results: list[AdmitResult]) -> None:
        """Give back what the admitted calls of a refused request reserved (all-or-nothing across slots)."""
        undo = [
            SettleCall(
                call.checks,
                [-_reserved_amount(check, call, result) for check in call.checks],
                call.request_id,
                result.now_ms,
            )
            for call, result in zip(calls, results, strict=True)
            if result.code == AdmitResult.ADMITTED
        ]
        if undo:
            with contextlib.suppress(StoreUnavailable):
                await self._guarded(lambda: self.store.settle(undo))

    async def _rebuild(self, calls: list[AdmitCall], periods: Periods, now_ms: int) -> None:
        for call in calls:
            slot = slot_of(call.checks[0].key)
            try:
                counters = await self._rebuild_source(slot, periods, now_ms)
            except Exception as exc:
                log.warning("cannot rebuild budgets of %s from SQL: %s", slot, type(exc).__name__)
                raise ServiceUnavailable(
                    "Budgets are being restored from the usage ledger and the database is unavailable; retry shortly.",
                    headers={"retry-after": "1"},
                ) from exc
            try:
                rebuilt = await self._guarded(partial(self.store.rebuild, marker_key(slot), counters))
            except StoreUnavailable:
                return
            if rebuilt:
                log.info("budgets of %s rebuilt from the ledger", slot, extra={"counters": len(counters)})

    def _raise_refusal(self, call: AdmitCall, result: AdmitResult, tokens: int) -> None:
        check = call.checks[result.failed]
        scope = check.scope
        assert scope is not None
        metrics.RATE_LIMITED.labels(scope.scope, check.metric).inc()
        what = _METRIC_TEXT[check.metric].format(window=duration(check.p1))
        budget = check.metric in _BUDGETS
        amount = 1 if check.metric in ("requests", "concurrency") else check.amount
        headers = retry_headers(result.retry_ms, should_retry=not budget and result.retry_ms >= 0)
        if check.kind == "sw":
            kind = "requests" if check.metric == "requests" else "tokens"
            headers.update(window_headers(kind, check.limit, 0, result.retry_ms))
        if budget:
            raise QuotaExceeded(
                f"The {scope.scope} '{scope.subject}' has exhausted its {what} ({check.limit}); this request would "
                f"need {amount} more.",
                headers=headers,
            )
        raise RateLimited(
            f"Rate limit reached for {scope.scope} '{scope.subject}' on {what}: limit {check.limit}, requested "
            f"{amount}. Please try again in {duration(result.retry_ms)}.",
            headers=headers,
        )

    def _reserved(
        self,
        ctx: RequestContext,
        calls: list[AdmitCall],
        results: list[AdmitResult],
        tokens: int,
        cost: int,
        completion: int,
        taken: Taken | None,
        local: Taken,
    ) -> list[tuple[Check, int]]:
        granted = min((result.granted for result in results if result.granted), default=0)
        admitted_ms = results[0].now_ms
        ctx.started_wall = admitted_ms / 1000  # the ledger places the request at its admission, on the store's clock
        if granted and granted < completion:
            ctx.max_tokens_granted = granted
            tokens = tokens - completion + granted
        reservation = Reservation(calls, admitted_ms, tokens, cost, taken=taken)
        request_id = ctx.request_id_text
        leases = [(check.key, request_id) for call in calls for check in call.checks if check.kind == "cc"]
        leases += [(check.key, member) for _, check, member in local if member]
        if leases:
            self._leases[request_id] = leases
        usage = [
            (check, value)
            for call, result in zip(calls, results, strict=True)
            for check, value in zip(call.checks, result.values, strict=True)
        ]
        usage += self._local_usage(local)
        reservation.headers = self._headers(usage)
        ctx.reservation = reservation
        return usage

    def _reserved_locally(self, ctx: RequestContext, taken: Taken, tokens: int, cost: int, now_ms: int) -> None:
        ctx.started_wall = now_ms / 1000
        leases = [(check.key, member) for _, check, member in taken if member]
        if leases:
            self._leases[ctx.request_id_text] = leases
        ctx.reservation = Reservation([], now_ms, tokens, cost, _grant_headers(taken), taken=taken)

    @staticmethod
    def _local_usage(taken: Taken) -> list[tuple[Check, int]]:
        # Only sliding windows make headers here: budgets are granted only while hard, so never over their limit.
        return [(check, grant.usage - grant.remaining) for grant, check, _ in taken if grant and check.kind == "sw"]

    async def _untake(self, local: Taken, tokens: int, cost: int, request_id: str) -> None:
        """Give back what an admission took from grants when the store's part of it failed."""
        if not local:
            return
        calls = Grants.untake(local, tokens, cost, request_id)
        if calls:  # a grant went back meanwhile: its share is the store's to refund
            with contextlib.suppress(StoreUnavailable):
                await self._guarded(lambda: self.store.settle(calls))

    async def _give_back(self, key: str) -> bool:
        """Return this worker's grant for a check the store refused; False if it held none."""
        assert self.grants is not None
        grant = self.grants.forget(key)
        if grant is None:
            return False
        await self._return([grant])
        return True

    async def _return(self, grants: list[Grant]) -> None:
        settle, release = Grants.returns(grants)
        operations = [self.store.release(key, members) for key, members in release]
        if settle:
            operations.append(self.store.settle(settle))
        # Lost if the store is down: the room stays counted until the window slides, the lease expires or the
        # budget period ends, so a lost return can only refuse too much, never admit too much.
        with contextlib.suppress(StoreUnavailable):
            await self._guarded(lambda: asyncio.gather(*operations))

    async def return_grants_forever(self, interval: float = 1 / SWEEPS_PER_SECOND) -> None:
        """Give back, soon after they expire, the grants whose bucket has passed or that were not used up."""
        assert self.grants is not None
        while True:
            await asyncio.sleep(interval)
            grants = self.grants.due()
            if grants:
                try:
                    await self._return(grants)
                except Exception as exc:  # a lost return only holds room until it expires in Redis
                    reraise_cancellation(exc)
                    log.warning("could not return limit grants: %s", type(exc).__name__)

    async def renew_grants(self) -> None:
        """Renew the grants of the period that just ended that were used (grants.py), a few scopes per round trip
        (`renewals_per_trip`) so that the requests of the moment are not queued behind all of them."""
        grants = self.grants
        assert grants is not None
        renewals = grants.renewals()
        start = 0
        while start < len(renewals):
            part = renewals[start : start + renewals_per_trip(self._renewal_trip_seconds)]
            ended = [grant for renewal in part for grant in renewal.ended if grant is not None]
            trip = asyncio.ensure_future(
                self._guarded(partial(self.store.admit, [renewal.call for renewal in part], Grants.returns(ended)))
            )
            sent = time.monotonic()
            try:
                results = await asyncio.shield(trip)
            except (StoreUnavailable, asyncio.CancelledError) as exc:
                # What was not sent goes back with a later sweep, or with `close`.
                grants.retire([grant for renewal in renewals[start:] for grant in renewal.ended if grant is not None])
                if isinstance(exc, asyncio.CancelledError):
                    # Shutting down: the trip is on its way; what it reserves must be known to `close` to go back
                    # (a budget's share would otherwise stay counted until the day or month ends).
                    with contextlib.suppress(StoreUnavailable):
                        grants.renewed(part, await trip)
                    raise
                TALLY.count(metrics.GRANT_RENEWALS, _UNSENT, len(renewals) - start)
                return
            self._renewal_trip_seconds = time.monotonic() - sent
            grants.renewed(part, results)
            start += len(part)
            renewed = sum(result.code == AdmitResult.ADMITTED for result in results)
            TALLY.count(metrics.GRANT_RENEWALS, ("renewed",), renewed)
            if renewed < len(results):
                TALLY.count(metrics.GRANT_RENEWALS, ("refused",), len(results) - renewed)

    async def renew_grants_forever(self) -> None:
        assert self.grants is not None
        while True:
            await asyncio.sleep(self.grants.until_renewal())
            try:
                await self.renew_grants()
            except Exception as exc:  # not renewed: the keys' next requests are admitted through the store
                reraise_cancellation(exc)
                log.warning("could not renew limit grants: %s", type(exc).__name__)

    async def close(self) -> None:
        """At shutdown: every grant goes back, so other workers can use the room at once."""
        if self.grants is not None:
            grants = self.grants.due(everything=True)
            if grants:
                await self._return(grants)

    def _headers(self, usage: Iterable[tuple[Check, int]]) -> dict[str, str]:
        tightest: dict[str, tuple[int, int, int]] = {}
        warnings = []
        for check, value in usage:
            if check.kind == "sw":
                kind = "requests" if check.metric == "requests" else "tokens"
                remaining = check.limit - value
                if kind not in tightest or remaining < tightest[kind][1]:
                    tightest[kind] = (check.limit, remaining, check.p1 + check.p2)
            elif check.kind in ("bd", "bm") and value > check.limit and check.scope is not None:
                warnings.append(f"{check.scope.scope}:{check.metric}")
                metrics.BUDGET_SOFT_EXCEEDED.labels(check.scope.scope, check.metric).inc()
        headers: dict[str, str] = {}
        for kind, (limit, remaining, reset_ms) in tightest.items():
            add_window_headers(headers, kind, limit, remaining, reset_ms)
        if warnings:
            headers["x-gateway-budget-exceeded"] = ",".join(warnings)
        return headers

    def headers(self, ctx: RequestContext) -> dict[str, str] | None:
        reservation = ctx.reservation
        return reservation.headers if isinstance(reservation, Reservation) else None

    # --- settlement --------------------------------------------------------------------------------------

    def settle_calls(self, ctx: RequestContext) -> list[SettleCall]:
        """What settling this request takes (no I/O): the ledger buffer runs it in the same round trip that makes
        the usage record durable."""
        reservation = ctx.reservation
        if not isinstance(reservation, Reservation):
            return []
        self._leases.pop(ctx.request_id_text, None)
        used_tokens = ctx.usage.prompt_tokens + ctx.usage.completion_tokens
        used_cost = ctx.cost_nanousd
        if reservation.taken is not None:
            deltas = self._deltas([check for _, check, _ in reservation.taken], reservation, used_tokens, used_cost)
            calls = Grants.settle(reservation.taken, deltas, ctx.request_id_text, reservation.admitted_ms)
        else:
            calls = [
                SettleCall(
                    call.checks,
                    self._deltas(call.checks, reservation, used_tokens, used_cost),
                    call.request_id,
                    reservation.admitted_ms,
                )
                for call in reservation.calls
            ]
        if self.grants is not None and calls:
            self.grants.settled(calls)
        return calls

    @staticmethod
    def _deltas(checks: Sequence[Check], reservation: Reservation, used_tokens: int, used_cost: int) -> list[int]:
        """What settling charges each check: the real usage less what was reserved. Amounts from the reservation,
        not the checks: a request admitted from grants carries its templates. Fail-open admissions reserved
        nothing: the request itself is charged now that the store is back."""
        reserved = reservation.reserved
        tokens = used_tokens - (reservation.tokens if reserved else 0)
        cost = used_cost - (reservation.cost if reserved else 0)
        request = 0 if reserved else 1
        return [
            tokens
            if check.tokens
            else request
            if check.metric == "requests"
            else 0
            if check.metric in _UNCHARGED
            else cost
            for check in checks
        ]

    @property
    def store_status(self) -> str:
        if isinstance(self.store, LocalStore):
            return "not configured"
        return "up" if self.store_healthy and self.breaker.state is BreakerState.CLOSED else "down"

    async def probe_forever(self, interval: float = 1.0) -> None:
        """Keep `store_healthy` current for /ready and metrics, and close the breaker as soon as Redis is back."""
        while True:
            try:
                async with asyncio.timeout(self.timeout):
                    await self.store.time_ms()
            except (RedisError, OSError, TimeoutError) as exc:
                reraise_cancellation(exc)
                self.store_healthy = False
            else:
                self.store_healthy = True
                self.breaker.success()
            metrics.REDIS_UP.set(1 if self.store_healthy else 0)
            await asyncio.sleep(interval)

    # --- leases ------------------------------------------------------------------------------------------

    async def heartbeat_forever(self) -> None:
        """One batched renewal per process for the leases of all its long-running requests."""
        interval = max(self._lease_ms / 3000, 0.5)
        while True:
            await asyncio.sleep(interval)
            if not self._leases:
                continue
            try:
                now_ms = await self.store.time_ms()
                expiry = now_ms + self._lease_ms
                leases = [(key, member, expiry) for held in self._leases.values() for key, member in held]
                await self.store.renew(leases)
            except Exception as exc:  # a lease not renewed this time is renewed at the next beat, or expires
                reraise_cancellation(exc)
