"""The aiohttp application: vLLM's OpenAI-compatible routes plus the ``/mock/`` control plane.

Cancellation: the server must run with ``handler_cancellation=True`` (``serve()`` and
the CLI do), so a client hanging up cancels its handler; the handler then records the
cancellation and how many completion tokens had been sent (streaming) or generated
(non-streaming) by then.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, NoReturn

import orjson
from aiohttp import web

from .config import MockConfig
from .faults import Fault
from .generation import Reply, embedding, generate
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .metrics import render_metrics
from .protocol import (
    ApiError,
    GenerationRequest,
    check_media_type,
    error_body,
    parse_chat,
    parse_completion,
    parse_embedding,
    parse_json,
    parse_tokenize,
)
from .responses import (
    DONE,
    StreamFormat,
    chat_body,
    completion_body,
    embedding_body,
    models_body,
    response_id,
    system_fingerprint,
)
from .state import Engine, Job, LoadOverride, MockState
from .tokenizer import token_ids

__all__ = ["MAX_BODY_BYTES", "STATE", "RunningMock", "make_app", "serve"]

STATE = web.AppKey("mock_state", MockState)
_MODELS_BODY = web.AppKey("mock_models_body", bytes)
_FINGERPRINT = web.AppKey("mock_system_fingerprint", str)
#: Long prompts are legitimate; aiohttp's 1 MiB default body limit is not vLLM's.
MAX_BODY_BYTES = 64 * 1024 * 1024
_JSON = "application/json"
_SSE_HEADERS = {"Content-Type": "text/event-stream; charset=utf-8"}


def _json(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(obj), content_type=_JSON, headers=headers)


async def _forever(state: MockState) -> NoReturn:
    """Hang until the client goes away (the handler is cancelled); counted in ``stalled`` meanwhile."""
    state.stalled += 1
    state.notify()
    try:
        await asyncio.get_running_loop().create_future()
    finally:
        state.stalled -= 1
        state.notify()
    raise AssertionError("unreachable")


def _fault_response(fault: Fault) -> web.Response:
    body = (
        error_body(fault.status, f"Injected fault: HTTP {fault.status}.")
        if fault.body is None
        else orjson.dumps(fault.body)
    )
    return web.Response(status=fault.status, body=body, content_type=_JSON, headers=fault.headers)


def _pacing(config: MockConfig, fault: Fault | None) -> tuple[float, float]:
    """(time to first token, seconds between tokens), both in seconds; a ``slow`` fault overrides."""
    ttft_ms, tps = config.ttft_ms, config.tokens_per_second
    if fault is not None and fault.mode == "slow":
        if fault.ttft_ms is not None:
            ttft_ms = fault.ttft_ms
        if fault.tokens_per_second is not None:
            tps = fault.tokens_per_second
    return ttft_ms / 1000.0, (1.0 / tps if tps > 0 else 0.0)


def _token_time(index: int, ttft: float, interval: float) -> float:
    """When token ``index`` (0-based) of a sequence is due, relative to the request's start."""
    return ttft + index * interval


def _tokens_due(replies: Sequence[Reply], elapsed: float, ttft: float, interval: float) -> int:
    """Completion tokens generated ``elapsed`` seconds into a (non-streaming) generation."""
    if elapsed < ttft:
        return 0
    if interval <= 0:
        return sum(len(r.pieces) for r in replies)
    per_sequence = int((elapsed - ttft) / interval) + 1
    return sum(min(len(r.pieces), per_sequence) for r in replies)


def _abort(request: web.Request) -> None:
    """Drop the TCP connection without finishing the response (no terminating chunk, no [DONE])."""
    transport = request.transport
    if transport is not None:
        transport.abort()


# --- inference routes ---


async def _read_body(request: web.Request, state: MockState) -> dict[str, Any]:
    """The JSON body, logged; vLLM's 400 for another media type (checked first) or a body that is not JSON."""
    raw = await request.read()
    try:
        body = parse_json(raw)
    except ApiError:
        state.log_request(request, None)
        check_media_type(request.content_type)
        raise
    state.log_request(request, body)
    check_media_type(request.content_type)
    return body


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _generation(request, chat=True)


async def completions(request: web.Request) -> web.StreamResponse:
    return await _generation(request, chat=False)


async def _generation(request: web.Request, chat: bool) -> web.StreamResponse:
    state = request.app[STATE]
    config = state.config
    state.requests += 1
    state.notify()
    try:
        body = await _read_body(request, state)
        req = parse_chat(body, config) if chat else parse_completion(body, config)
    except ApiError as exc:
        state.errors += 1
        return exc.response()
    fault = state.faults.take(req.model)
    if fault is not None and fault.mode == "error":
        state.errors += 1
        return _fault_response(fault)
    ttft, interval = _pacing(config, fault)
    replies = [
        generate(req.model, text, req.seed, index, limit)
        for text, limit in zip(req.prompt_texts, req.max_tokens, strict=True)
        for index in range(req.n)
    ]
    engine = state.engines[req.model]
    job = Job(request.headers.get("X-Request-Id"))
    try:
        if fault is not None and (fault.mode == "stall" or (fault.mode == "stall_after" and not req.stream)):
            await _forever(state)
        if req.stream:
            return await _stream(request, state, engine, req, replies, job, fault, ttft, interval, chat)
        return await _complete(request, state, engine, req, replies, job, fault, ttft, interval, chat)
    except asyncio.CancelledError:
        state.record_cancelled(engine, job, len(replies))
        raise
    except ConnectionError:
        # A write hit the closed connection before the cancellation was delivered: same thing.
        state.record_cancelled(engine, job, len(replies))
        raise asyncio.CancelledError from None


async def _complete(
    request: web.Request,
    state: MockState,
    engine: Engine,
    req: GenerationRequest,
    replies: list[Reply],
    job: Job,
    fault: Fault | None,
    ttft: float,
    interval: float,
    chat: bool,
) -> web.StreamResponse:
    loop = asyncio.get_running_loop()
    longest = max((len(r.pieces) for r in replies), default=0)
    await engine.acquire()
    try:
        engine.admit(req.tokens)
        if fault is not None and fault.mode == "drop_after":
            due = min(fault.after_tokens, longest)
            delay = _token_time(due - 1, ttft, interval) if due > 0 else 0.0
        else:
            delay = _token_time(max(longest - 1, 0), ttft, interval) + state.config.latency_ms / 1000.0
        if delay > 0:
            started = loop.time()
            try:
                await asyncio.sleep(delay)
            except asyncio.CancelledError:
                job.sent = _tokens_due(replies, loop.time() - started, ttft, interval)
                raise
        if fault is not None and fault.mode == "drop_after":
            job.sent = sum(min(len(r.pieces), fault.after_tokens) for r in replies)
            state.record_dropped(engine, job)
            _abort(request)
            return web.Response()  # never sent: the transport is gone
    finally:
        engine.release()
    tokens = sum(len(r.pieces) for r in replies)
    job.sent = tokens
    rid = response_id("chatcmpl" if chat else "cmpl", request)
    build = chat_body if chat else completion_body
    body = build(rid, int(time.time()), req.model, replies, len(req.tokens), request.app[_FINGERPRINT])
    state.record_completed(engine, [r.finish_reason for r in replies], tokens)
    return web.Response(body=body, content_type=_JSON)


async def _stream(
    request: web.Request,
    state: MockState,
    engine: Engine,
    req: GenerationRequest,
    replies: list[Reply],
    job: Job,
    fault: Fault | None,
    ttft: float,
    interval: float,
    chat: bool,
) -> web.StreamResponse:
    loop = asyncio.get_running_loop()
    # Like vLLM (Starlette), headers go out at once; the first event waits for the first token.
    resp = web.StreamResponse(headers=_SSE_HEADERS)
    await resp.prepare(request)
    rid = response_id("chatcmpl" if chat else "cmpl", request)
    fmt = StreamFormat(chat, rid, int(time.time()), req.model, request.app[_FINGERPRINT], req.include_usage)
    prompt_len = len(req.tokens)
    # Continuous usage is per choice: its own prompt (a completions batch has several) and its tokens so far.
    choice_prompts: list[int | None] = (
        [length for length in req.prompt_lens for _ in range(req.n)] if req.continuous_usage else [None] * len(replies)
    )
    cut_after = fault.after_tokens if fault is not None and fault.mode in ("stall_after", "drop_after") else -1
    steps = max((len(r.pieces) for r in replies), default=0)

    await engine.acquire()
    try:
        engine.admit(req.tokens)
        start = loop.time()
        generated = 0
        pending: list[bytes] = []
        pending_tokens = 0
        if chat:
            pending += [fmt.role_chunk(index, choice_prompts[index]) for index in range(len(replies))]
        cut = False
        for step in range(steps):
            if step == 0 or interval:
                delay = start + _token_time(step, ttft, interval) - loop.time()
                if delay > 0:
                    # Send what is due before sleeping; when behind schedule, due steps share one write.
                    if pending_tokens:
                        await resp.write(b"".join(pending))
                        job.sent += pending_tokens
                        pending.clear()
                        pending_tokens = 0
                    await asyncio.sleep(delay)
            for index, reply in enumerate(replies):
                pieces = reply.pieces
                if step >= len(pieces):
                    continue
                if generated == cut_after:
                    cut = True
                    break
                generated += 1
                finish = reply.finish_reason if step == len(pieces) - 1 else None
                pending.append(fmt.token_chunk(index, pieces[step], finish, choice_prompts[index], step + 1))
                pending_tokens += 1
            if cut:
                break
        if cut_after >= 0:
            # stall_after / drop_after: the first k token chunks go out, then the stream never finishes.
            await resp.write(b"".join(pending))
            job.sent += pending_tokens
            assert fault is not None
            if fault.mode == "stall_after":
                await _forever(state)
            state.record_dropped(engine, job)
            _abort(request)
            return resp
        if req.include_usage:
            pending.append(fmt.usage_chunk(prompt_len, generated))
        pending.append(DONE)
        await resp.write_eof(b"".join(pending))  # last events and the terminating chunk in one send
        job.sent += pending_tokens
    finally:
        engine.release()
    state.record_completed(engine, [r.finish_reason for r in replies], generated)
    return resp


async def embeddings(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    config = state.config
    state.requests += 1
    state.notify()
    try:
        body = await _read_body(request, state)
        req = parse_embedding(body, config)
    except ApiError as exc:
        state.errors += 1
        return exc.response()
    fault = state.faults.take(req.model)
    if fault is not None and fault.mode == "error":
        state.errors += 1
        return _fault_response(fault)
    engine = state.engines[req.model]
    job = Job(request.headers.get("X-Request-Id"))
    try:
        if fault is not None and fault.mode in ("stall", "stall_after"):
            await _forever(state)
        if fault is not None and fault.mode == "drop_after":
            state.record_dropped(engine, job)
            _abort(request)
            return web.Response()
        ttft, _ = _pacing(config, fault)
        delay = ttft + config.latency_ms / 1000.0
        if delay > 0:
            await asyncio.sleep(delay)
    except asyncio.CancelledError:
        state.record_cancelled(engine, job, 1)
        raise
    vectors = [embedding(req.model, key, config.embedding_dim, req.dimensions, req.as_base64) for key in req.keys]
    engine.prompt_tokens += req.prompt_tokens
    state.record_completed(engine, ["stop"], 0)
    reply = embedding_body(response_id("embd", request), int(time.time()), req.model, vectors, req.prompt_tokens)
    return web.Response(body=reply, content_type=_JSON)


async def tokenize(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    try:
        body = await _read_body(request, state)
        _model, tokens, return_strs = parse_tokenize(body, state.config)
    except ApiError as exc:
        return exc.response()
    return _json(
        {
            "count": len(tokens),
            "max_model_len": state.config.max_model_len,
            "tokens": token_ids(tokens),
            "token_strs": [str(t) for t in tokens] if return_strs else None,
        }
    )


async def list_models(request: web.Request) -> web.StreamResponse:
    return web.Response(body=request.app[_MODELS_BODY], content_type=_JSON)


async def health(request: web.Request) -> web.StreamResponse:
    return web.Response()


async def not_found(request: web.Request) -> web.StreamResponse:
    """Starlette's JSON answers for an unknown route (404) or a known route with another method (405)."""
    methods = sorted(
        route.method
        for resource in request.app.router.resources()
        if resource.canonical == request.path
        for route in resource
        if route.method != "*"
    )
    if methods:
        return _json({"detail": "Method Not Allowed"}, status=405, headers={"Allow": ", ".join(methods)})
    return _json({"detail": "Not Found"}, status=404)


async def version(request: web.Request) -> web.StreamResponse:
    return _json({"version": "mock"})


async def metrics(request: web.Request) -> web.StreamResponse:
    text = render_metrics(request.app[STATE])
    return web.Response(body=text.encode(), headers={"Content-Type": METRICS_CONTENT_TYPE})


# --- control plane ---


async def _control_body(request: web.Request) -> Any:
    raw = await request.read()
    try:
        return orjson.loads(raw) if raw else {}
    except orjson.JSONDecodeError as exc:
        raise web.HTTPBadRequest(text=f"invalid JSON: {exc}") from None


async def get_stats(request: web.Request) -> web.StreamResponse:
    return _json(request.app[STATE].stats())


async def get_cancelled(request: web.Request) -> web.StreamResponse:
    return _json(list(request.app[STATE].cancelled_log))


async def get_requests(request: web.Request) -> web.StreamResponse:
    return _json(list(request.app[STATE].requests_log))


async def delete_requests(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    state.requests_log.clear()
    state.reset_stats()
    return _json({"ok": True})


async def get_faults(request: web.Request) -> web.StreamResponse:
    return _json({"faults": request.app[STATE].faults.to_json()})


async def set_faults(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    try:
        state.faults.replace(await _control_body(request))
    except ValueError as exc:
        return _json({"error": str(exc)}, status=400)
    return _json({"faults": state.faults.to_json()})


async def delete_faults(request: web.Request) -> web.StreamResponse:
    request.app[STATE].faults.clear()
    return _json({"ok": True})


def _load_to_json(state: MockState) -> dict[str, Any]:
    return {
        "overrides": [
            {
                "model": model,
                "running": o.running,
                "waiting": o.waiting,
                "kv_cache_usage_perc": o.kv_cache_usage_perc,
            }
            for model, o in state.load.items()
        ]
    }


async def get_load(request: web.Request) -> web.StreamResponse:
    return _json(_load_to_json(request.app[STATE]))


async def set_load(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    body = await _control_body(request)
    if not isinstance(body, dict):
        return _json({"error": "body must be an object"}, status=400)
    override = LoadOverride()
    for key in ("running", "waiting"):
        value = body.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            return _json({"error": f"{key} must be a non-negative integer or null"}, status=400)
        setattr(override, key, value)
    kv = body.get("kv_cache_usage_perc")
    if kv is not None and (not isinstance(kv, int | float) or isinstance(kv, bool) or not 0 <= kv <= 1):
        return _json({"error": "kv_cache_usage_perc must be a number in [0, 1] or null"}, status=400)
    override.kv_cache_usage_perc = None if kv is None else float(kv)
    model = body.get("model")
    if model is not None and model not in state.engines:
        return _json({"error": f"unknown model {model!r}"}, status=400)
    state.load[model] = override
    return _json(_load_to_json(state))


async def delete_load(request: web.Request) -> web.StreamResponse:
    request.app[STATE].load.clear()
    return _json({"ok": True})


async def reset(request: web.Request) -> web.StreamResponse:
    request.app[STATE].reset()
    return _json({"ok": True})


def make_app(config: MockConfig | None = None) -> web.Application:
    """The mock server's application; its state is ``app[STATE]``."""
    config = config or MockConfig()
    app = web.Application(client_max_size=MAX_BODY_BYTES)
    state = MockState(config)
    app[STATE] = state
    app[_MODELS_BODY] = models_body(config.models, state.started, config.max_model_len)
    app[_FINGERPRINT] = system_fingerprint(config.models, config.max_model_len, config.embedding_dim)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/embeddings", embeddings)
    app.router.add_get("/v1/models", list_models)
    app.router.add_post("/tokenize", tokenize)
    app.router.add_get("/health", health)
    app.router.add_get("/version", version)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/mock/stats", get_stats)
    app.router.add_get("/mock/cancelled", get_cancelled)
    app.router.add_get("/mock/requests", get_requests)
    app.router.add_delete("/mock/requests", delete_requests)
    app.router.add_get("/mock/faults", get_faults)
    app.router.add_post("/mock/faults", set_faults)
    app.router.add_delete("/mock/faults", delete_faults)
    app.router.add_get("/mock/load", get_load)
    app.router.add_post("/mock/load", set_load)
    app.router.add_delete("/mock/load", delete_load)
    app.router.add_post("/mock/reset", reset)
    app.router.add_route("*", "/{path:.*}", not_found)  # last: only what no route above takes
    return app


@dataclass(frozen=True, slots=True)
class RunningMock:
    """A mock server started in the current event loop by :func:`serve`."""

    app: web.Application
    state: MockState
    host: str
    port: int

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:43123`` (append ``/v1`` for an OpenAI client)."""
        return f"http://{self.host}:{self.port}"


@asynccontextmanager
async def serve(config: MockConfig | None = None, host: str = "127.0.0.1", port: int = 0) -> AsyncIterator[RunningMock]:
    """Run a mock server in this event loop (``port=0``: a free port) for in-process tests."""
    app = make_app(config)
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound = runner.addresses[0][1]
        yield RunningMock(app, app[STATE], host, bound)
    finally:
        await runner.cleanup()
