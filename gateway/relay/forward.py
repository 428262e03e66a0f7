"""Non-streaming relay: one upstream request, the whole answer back, usage read from it."""

from __future__ import annotations

import asyncio

import orjson

from gateway.context import RequestContext, Usage
from gateway.relay.body import rename_model_back
from gateway.relay.sse import finish_reason, usage_from_mapping
from gateway.routing.table import Endpoint
from gateway.upstream.errors import error_from_upstream, translate_errors
from gateway.upstream.pool import UpstreamPool, endpoint_url


async def forward(pool: UpstreamPool, ctx: RequestContext, endpoint: Endpoint, path: str, body: bytes) -> bytes:
    deployment = endpoint.deployment
    session = pool.session(deployment)
    with translate_errors(ctx.model):
        async with (
            asyncio.timeout(deployment.timeouts.first_byte),
            session.post(
                endpoint_url(endpoint, path), data=body, headers=pool.headers(deployment), proxy=endpoint.proxy
            ) as resp,
        ):
            payload = await resp.read()
            status = resp.status
            headers = resp.headers
    ctx.mark_first_token()
    if status != 200:
        raise error_from_upstream(status, payload, headers, ctx.model)
    usage, reason = read_usage(payload)
    if usage is not None:
        ctx.usage = usage
    ctx.finish_reason = reason
    return rename_model_back(payload, deployment)


def read_usage(payload: bytes) -> tuple[Usage | None, str | None]:
    """Usage sits at the end of vLLM's and OpenAI's answers: parse just that object when we can find it, since
    embeddings answers can be megabytes of numbers."""
    start = payload.rfind(b'"usage"')
    if start >= 0:
        brace = _object_start(payload, start + len(b'"usage"'))
        end = payload.find(b"}", brace) if brace >= 0 else -1
        # A usage object may nest one level (`*_tokens_details`); take the span up to the matching brace.
        while brace >= 0 and end >= 0 and payload.count(b"{", brace, end) > payload.count(b"}", brace, end + 1):
            end = payload.find(b"}", end + 1)
        if brace >= 0 and end >= 0:
            try:
                return usage_from_mapping(orjson.loads(payload[brace : end + 1])), finish_reason(payload)
            except orjson.JSONDecodeError:
                pass
    try:
        parsed = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None, None
    if not isinstance(parsed, dict):
        return None, None
    return usage_from_mapping(parsed.get("usage")), finish_reason(payload)


def _object_start(payload: bytes, index: int) -> int:
    """The index of the `{` right after `"usage"` and its colon, or -1 (e.g. `"usage": null`)."""
    length = len(payload)
    while index < length and payload[index] in b" \t\r\n:":
        index += 1
    return index if index < length and payload[index] == ord("{") else -1
