"""The proxy handler: the request pipeline, stage by stage, in one readable place.

    auth → body → validation → model lookup/permission → limits (admission) → route → relay → meter

Everything up to admission may refuse the request without a usage record. From admission on, the request is
*admitted*: whatever happens next (success, upstream error, timeout, hang-up) it is finalised exactly once by
`finish`, shielded from cancellation, which settles its limits and makes its usage record durable (Redis stream or
local spool, in the same round trip) before the client gets the last byte; the ledger writer takes it into SQL.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine

from aiohttp import web

from gateway import metrics
from gateway.access_log import log_access
from gateway.auth.store import KeyRecord, authenticate, authorize_model, bearer_token
from gateway.context import REQUEST_ID, RequestContext
from gateway.errors import GatewayError, ServiceUnavailable
from gateway.metering.records import encode, usage_row
from gateway.routing.table import GroupRoute, ModelRoute
from gateway.state import GatewayState
from gateway.tally import TALLY
from gateway.validation import CHAT, COMPLETIONS, EMBEDDINGS, Call, parse_call

log = logging.getLogger(__name__)

_CLIENT_REQUEST_ID_MAX = 128


def client_request_id(request: web.Request) -> str | None:
    value = request.headers.get("x-request-id")
    if not value:
        return None
    value = value[:_CLIENT_REQUEST_ID_MAX]
    return value if value.isprintable() else None


def response_headers(request: web.Request, ctx: RequestContext | None = None) -> dict[str, str]:
    gateway_id = ctx.request_id_text if ctx is not None else str(request[REQUEST_ID])
    client_id = ctx.client_request_id if ctx is not None else client_request_id(request)
    return {"x-request-id": client_id or gateway_id, "x-gateway-request-id": gateway_id}


class Proxy:
    def __init__(self, state: GatewayState) -> None:
        self.state = state
        self._pending: set[asyncio.Task[None]] = set()

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, CHAT)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, COMPLETIONS)

    async def embeddings(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, EMBEDDINGS)

    async def _handle(self, request: web.Request, endpoint: str) -> web.StreamResponse:
        try:
            ctx, call, route, admission = await self._admit(request, endpoint)
        except GatewayError as exc:
            _count_refusal(request, endpoint, exc, self.state)
            raise
        return await self._serve(request, ctx, call, route, admission)

    async def _admit(
        self, request: web.Request, endpoint: str
    ) -> tuple[RequestContext, Call, ModelRoute | GroupRoute, Coroutine[None, None, None] | None]:
        """Everything that may refuse a request before it costs anything: no usage record for these. Returns
        the limit store's part of admission when it may overlap the upstream request (`QuotaLimiter.overlaps`);
        otherwise the request is admitted on return."""
        state = self.state
        snapshot = state.snapshot.current
        key = authenticate(snapshot.keys, state.pepper, bearer_token(request.headers.get("Authorization")))
        request[_KEY] = key
        raw = await request.read()
        call = parse_call(endpoint, raw)
        request[_MODEL] = call.model
        route = state.routes.resolve(call.model)
        authorize_model(key, call.model)

        ctx = RequestContext.begin(request[REQUEST_ID], endpoint)
        ctx.client_request_id = client_request_id(request)
        ctx.key = key
        ctx.model = call.model
        ctx.stream = call.stream
        ctx.client_wants_usage = call.include_usage
        ctx.max_tokens = call.max_tokens
        ctx.end_user = call.end_user
        ctx.payload = call.payload
        ctx.raw = raw
        if state.ledger.full:
            raise ServiceUnavailable(
                "The gateway's usage buffer is full (the database has been unreachable for a while); new requests "
                "are refused until it drains, so that no usage is lost.",
                headers={"retry-after": "5"},
            )
        limiter = state.limiter
        admission = limiter.begin(ctx)
        if admission is not None and not limiter.overlaps(ctx):
            await admission
            admission = None
        return ctx, call, route, admission

    async def _serve(
        self,
        request: web.Request,
        ctx: RequestContext,
        call: Call,
        route: ModelRoute | GroupRoute,
        admission: Coroutine[None, None, None] | None,
    ) -> web.StreamResponse:
        state = self.state
        key = ctx.key
        assert key is not None
        raw = ctx.raw
        headers: dict[str, str] = {}
        if admission is not None:  # at once: a coroutine never awaited would be an admission never made
            ctx.admission = asyncio.ensure_future(self._admit_beside(admission, ctx, headers))
        # Admitted (or, with an overlapping admission, once `ctx.admitted()` returns): exactly one usage record.
        TALLY.level(metrics.IN_FLIGHT, (), 1)
        try:
            headers.update(response_headers(request, ctx))
            if admission is None:
                self._add_limit_headers(ctx, headers)
            plan = state.dispatcher.plan(route, key.may_use)
            return await state.dispatcher.dispatch(request, ctx, call, raw, plan, headers, self.finish)
        except GatewayError as exc:
            refusal = await _refusal(ctx)
            if refusal is not None:
                _count_refusal(request, ctx.endpoint, refusal, state)
                raise refusal from None
            ctx.status = exc.status
            ctx.error_type = exc.code if isinstance(exc.code, str) else exc.type
            limit_headers = state.limiter.headers(ctx)
            if limit_headers:
                exc.headers = {**limit_headers, **exc.headers}
            raise
        except (asyncio.CancelledError, ConnectionResetError):
            self._mark_hang_up(request, ctx)
            raise
        except Exception:
            ctx.status = 500
            ctx.error_type = "internal_error"
            raise
        finally:
            TALLY.level(metrics.IN_FLIGHT, (), -1)
            if ctx.refused:
                assert ctx.admission is not None
                ctx.admission.cancel()  # a hang-up while it ran: neither admitted nor refused, as before dispatch
            elif not ctx.finished:
                await self.finish(ctx)

    async def _admit_beside(
        self, admission: Coroutine[None, None, None], ctx: RequestContext, headers: dict[str, str]
    ) -> None:
        try:
            await admission
        except GatewayError:
            TALLY.count(metrics.ADMISSION_OVERLAPS, ("refused",))
            raise
        TALLY.count(metrics.ADMISSION_OVERLAPS, ("admitted",))
        self._add_limit_headers(ctx, headers)  # before anything goes to the client: `ctx.admitted()` comes first

    def _add_limit_headers(self, ctx: RequestContext, headers: dict[str, str]) -> None:
        limit_headers = self.state.limiter.headers(ctx)
        if limit_headers:
            headers.update(limit_headers)

    @staticmethod
    def _mark_hang_up(request: web.Request, ctx: RequestContext) -> None:
        transport = request.transport
        ctx.client_disconnected = transport is None or transport.is_closing()
        ctx.status = 499  # the client closed the request (nginx's convention)
        ctx.error_type = "client_disconnected" if ctx.client_disconnected else "cancelled"

    async def finish(self, ctx: RequestContext) -> None:
        """The request's one finalisation; runs to the end even if the handler is cancelled meanwhile."""
        if ctx.finished:
            return
        ctx.finished = True
        task = asyncio.ensure_future(self._finalise(ctx))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)
        await asyncio.shield(task)

    async def _finalise(self, ctx: RequestContext) -> None:
        state = self.state
        ctx.ended = time.perf_counter()
        if ctx.usage.source == "none":
            self._count_usage(ctx)
        row = usage_row(ctx, state.snapshot.current.prices)
        ctx.cost_nanousd = row["cost_nanousd"]
        try:
            await state.ledger.record(row, state.limiter.settle_calls(ctx))
        except Exception:
            # Neither Redis nor the spool took it (e.g. the disk is full): the log is the last place it can go.
            log.critical("usage record not buffered", exc_info=True, extra={"usage_record": encode(row).decode()})
        _observe(ctx, row["cost_nanousd"])
        log_access(ctx, row)
        if ctx.key is not None:
            metrics.observe_key(
                ctx.key.display_prefix,
                ctx.key.user_name,
                ctx.key.team_name,
                ctx.status,
                ctx.usage.prompt_tokens,
                ctx.usage.completion_tokens,
                row["cost_nanousd"],
            )

    def _count_usage(self, ctx: RequestContext) -> None:
        """The upstream never reported usage (hang-up, failure mid-stream): count what we can ourselves.

        Billed: the prompt (estimated) and the chunks relayed, when the upstream produced output or the client
        hung up while it worked. An upstream that failed before producing anything is not billed."""
        if ctx.deployment is None or ctx.payload is None:
            return
        if ctx.relayed_chunks or ctx.client_disconnected:
            ctx.usage.prompt_tokens = self.state.estimator.count_prompt(ctx.endpoint, ctx.payload)
            ctx.usage.completion_tokens = ctx.relayed_chunks
            ctx.usage.source = "counted"

    async def wait_finalising(self) -> None:
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)


async def _refusal(ctx: RequestContext) -> GatewayError | None:
    """The refusal of an overlapping admission, once it has decided: the client gets it, not the upstream's
    error, as if the admission had come first."""
    if ctx.admission is None:
        return None
    try:
        await ctx.admitted()
    except GatewayError as refusal:
        return refusal
    return None


def _observe(ctx: RequestContext, cost_nanousd: int) -> None:
    team = ctx.key.team_name if ctx.key else ""
    model = ctx.model
    TALLY.count(metrics.REQUESTS, (ctx.endpoint, model, team, str(ctx.status)))
    duration = ctx.duration_ms / 1000
    TALLY.observe(metrics.REQUEST_SECONDS, (ctx.endpoint, model), duration)
    if ctx.first_token_ms is not None and ctx.stream:
        TALLY.observe(metrics.FIRST_TOKEN_SECONDS, (model,), ctx.first_token_ms / 1000)
    usage = ctx.usage
    if usage.prompt_tokens:
        TALLY.count(metrics.TOKENS, (model, team, "prompt"), usage.prompt_tokens)
    if usage.completion_tokens:
        TALLY.count(metrics.TOKENS, (model, team, "completion"), usage.completion_tokens)
    if cost_nanousd:
        TALLY.count(metrics.COST, (model, team), cost_nanousd)
    if ctx.deployment is not None:
        # Where the time went: in the upstream, and in the gateway itself (the rest).
        TALLY.observe(metrics.UPSTREAM_SECONDS, (ctx.deployment.name, model), ctx.upstream_seconds)
        TALLY.observe(metrics.OVERHEAD_SECONDS, (ctx.endpoint,), max(duration - ctx.upstream_seconds, 0.0))


_KEY = web.RequestKey("gateway_key", KeyRecord)
_MODEL = web.RequestKey("gateway_model", str)


def _count_refusal(request: web.Request, endpoint: str, error: GatewayError, state: GatewayState) -> None:
    """Requests refused before admission have no usage record: count them here (model label only for known
    models, so a client inventing names cannot blow up the label set)."""
    model = request.get(_MODEL, "")
    key = request.get(_KEY)
    TALLY.count(
        metrics.REQUESTS,
        (endpoint, model if state.routes.exists(model) else "", key.team_name if key else "", str(error.status)),
    )
