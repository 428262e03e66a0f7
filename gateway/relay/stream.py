"""Streaming relay: each SSE event goes to the client as soon as its blank line arrives, never held back
(events that arrive in one read leave in one write).

The gateway always asks the upstream for usage; the usage-only chunk is removed for clients that did not ask
for it. `finish` (the request's shielded finalisation) runs before the client gets `data: [DONE]`, so the
usage record exists before the last byte leaves.

The client's response starts with the first upstream event, not with the upstream's headers: until then nothing
has gone to the client, so a failure (connection, status, a stall or a drop before the first event) is raised
as an error the dispatcher may retry on another deployment. After it, a failure reaches the client as an error
event followed by `data: [DONE]`: a stream is never retried once it has begun.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import aiohttp
from aiohttp import web

from gateway.context import RequestContext
from gateway.errors import GatewayError, UpstreamTimeout, UpstreamUnreachable
from gateway.relay import sse
from gateway.relay.body import rename_model_back
from gateway.routing.table import DeploymentRuntime, Endpoint
from gateway.upstream.errors import error_from_upstream, translate_errors
from gateway.upstream.pool import UpstreamPool, endpoint_url

Finish = Callable[[RequestContext], Awaitable[None]]

_SSE_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",  # tell nginx-style proxies in front of us not to buffer
}


class _UpstreamBroke(Exception):
    def __init__(self, error: GatewayError) -> None:
        self.error = error


async def stream(
    request: web.Request,
    pool: UpstreamPool,
    ctx: RequestContext,
    endpoint: Endpoint,
    path: str,
    body: bytes,
    finish: Finish,
    headers: dict[str, str],
) -> web.StreamResponse:
    deployment = endpoint.deployment
    session = pool.session(deployment)
    timeouts = deployment.timeouts
    with translate_errors(ctx.model):
        async with asyncio.timeout(timeouts.first_byte):
            upstream = await session.post(
                endpoint_url(endpoint, path),
                data=body,
                headers=pool.headers(deployment),
                proxy=endpoint.proxy,
                timeout=aiohttp.ClientTimeout(
                    total=None,
                    connect=timeouts.connect,
                    sock_connect=timeouts.connect,
                    sock_read=timeouts.idle,
                ),
            )
    completed = False
    try:
        if upstream.status != 200:
            with translate_errors(ctx.model):
                async with asyncio.timeout(timeouts.first_byte):
                    payload = await upstream.read()
            raise error_from_upstream(upstream.status, payload, upstream.headers, ctx.model)
        decoder = sse.SSEDecoder()
        first = await _first_events(upstream, decoder, ctx, not deployment.renames_model)
        await ctx.admitted()  # the limit headers come with the admission
        response = web.StreamResponse(status=200, headers={**_SSE_HEADERS, **headers})
        await response.prepare(request)
        ctx.status = 200
        completed = await _relay_events(upstream, response, ctx, deployment, finish, decoder, first)
        return response
    finally:
        if completed:
            upstream.release()
        else:
            upstream.close()  # drops the connection: the upstream sees the cancellation at once


async def _read(upstream: aiohttp.ClientResponse, ctx: RequestContext) -> bytes:
    try:
        chunk = await upstream.content.readany()
    except TimeoutError as exc:
        raise _UpstreamBroke(UpstreamTimeout(f"The upstream serving model '{ctx.model}' stalled.")) from exc
    except aiohttp.ClientError as exc:
        raise _UpstreamBroke(
            UpstreamUnreachable(f"The connection to the upstream serving model '{ctx.model}' broke.")
        ) from exc
    if not chunk:
        raise _UpstreamBroke(UpstreamUnreachable(f"The upstream serving model '{ctx.model}' ended the stream early."))
    return chunk


async def _first_events(
    upstream: aiohttp.ClientResponse, decoder: sse.SSEDecoder, ctx: RequestContext, plain: bool
) -> list[tuple[bytes, int]]:
    """Wait for the first whole event; a failure before it is an ordinary (retryable) upstream error."""
    while True:
        try:
            pieces = _decode(decoder, await _read(upstream, ctx), plain)
        except _UpstreamBroke as broke:
            raise broke.error from broke.__cause__
        if pieces:
            return pieces


def _decode(decoder: sse.SSEDecoder, chunk: bytes, plain: bool) -> list[tuple[bytes, int]]:
    """The whole events of a read, with runs of plain text events grouped (`sse.runs`) where `plain` allows."""
    if plain:
        block = decoder.feed_block(chunk)
        if block is not None:
            return sse.runs(block)
    return [(event, 0) for event in decoder.feed(chunk)]


async def _relay_events(
    upstream: aiohttp.ClientResponse,
    response: web.StreamResponse,
    ctx: RequestContext,
    deployment: DeploymentRuntime,
    finish: Finish,
    decoder: sse.SSEDecoder,
    pending: list[tuple[bytes, int]],
) -> bool:
    """Relays until `[DONE]`; returns whether the upstream completed cleanly.

    The events that arrived in one read leave in one write: the same bytes, no later, one system call. Runs of
    plain text events are only counted; every other event is read (usage, finish reason, `[DONE]`, renaming)."""
    wants_usage = ctx.client_wants_usage
    plain = not deployment.renames_model
    try:
        while True:
            out: list[bytes] = []
            for event, plain_events in pending:
                if plain_events:
                    out.append(event)
                    ctx.relayed_chunks += plain_events
                    ctx.mark_first_token()
                    continue
                data = sse.event_data(event)
                if data is None:
                    out.append(event)  # comments and keep-alives pass as they are
                    continue
                if sse.is_done(data):
                    await _write(response, out)
                    await finish(ctx)
                    await response.write_eof(sse.DONE)
                    return True
                if not _observe(data, ctx) and not wants_usage:
                    continue
                out.append(rename_model_back(event, deployment) if deployment.renames_model else event)
            await _write(response, out)
            pending = _decode(decoder, await _read(upstream, ctx), plain)
    except _UpstreamBroke as broke:
        ctx.status = broke.error.status
        ctx.error_type = broke.error.code
        await finish(ctx)
        await response.write_eof(sse.error_event(broke.error.to_json()) + sse.DONE)
        return False


async def _write(response: web.StreamResponse, events: list[bytes]) -> None:
    if events:
        await response.write(events[0] if len(events) == 1 else b"".join(events))


def _observe(data: bytes, ctx: RequestContext) -> bool:
    """Reads usage, finish reason and first-token time off an event; False for a usage-only chunk."""
    if sse.carries_usage(data):
        usage = sse.usage_from_chunk(data)
        if usage is not None:
            ctx.usage = usage
        if sse.is_usage_only(data):
            return False
    if sse.is_content(data):
        ctx.mark_first_token()
        ctx.relayed_chunks += 1
    reason = sse.finish_reason(data)
    if reason is not None:
        ctx.finish_reason = reason
    return True
