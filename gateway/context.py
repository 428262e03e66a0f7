"""The one object that follows a request through the pipeline, and the app/request keys that carry state.

Invariant: every admitted request (past auth, validation and limits) is finalised exactly once, success or
error, by `Pipeline.finish`, which runs shielded from cancellation: a client hanging up cannot skip settling
its limits or writing its usage record.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from aiohttp import web

if TYPE_CHECKING:
    from gateway.auth.store import KeyRecord
    from gateway.routing.table import DeploymentRuntime

T = TypeVar("T")

REQUEST_ID = web.RequestKey("request_id", uuid.UUID)


@dataclass(slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0
    reasoning_tokens: int = 0
    # "backend": reported by the upstream; "counted": counted by the gateway (e.g. after a hang-up); "none"
    source: str = "none"


@dataclass(slots=True)
class RequestContext:
    request_id: uuid.UUID
    request_id_text: str  # str(request_id), made once: the limiter, headers and access log all need it
    endpoint: str
    started_wall: float  # Unix time
    started: float  # perf_counter, for durations
    client_request_id: str | None = None
    key: KeyRecord | None = None
    model: str = ""
    end_user: str | None = None
    stream: bool = False
    client_wants_usage: bool = False
    max_tokens: int | None = None
    payload: dict[str, Any] | None = None  # the parsed request body
    raw: bytes = b""  # the request body as received
    deployment: DeploymentRuntime | None = None
    upstream_model: str | None = None
    reservation: Any = None
    max_tokens_granted: int | None = None  # set when the limiter lowered max_tokens to fit (opt-in clamping)
    cost_nanousd: int = 0
    status: int = 0
    error_type: str | None = None
    finish_reason: str | None = None
    client_disconnected: bool = False
    first_token: float | None = None  # perf_counter
    queue_ms: float | None = None  # waiting for a deployment slot
    upstream_seconds: float = 0.0  # request sent upstream → last byte, over all attempts
    ended: float | None = None
    usage: Usage = field(default_factory=Usage)
    # Content chunks relayed to the client: the fallback completion count when the backend's usage is lost.
    relayed_chunks: int = 0
    finished: bool = False
    # The store's part of admission while it runs beside the upstream request (QuotaLimiter.overlaps): nothing
    # goes to the client, and no usage record is made, before `admitted()` has returned.
    admission: asyncio.Task[None] | None = None

    @classmethod
    def begin(cls, request_id: uuid.UUID, endpoint: str) -> RequestContext:
        return cls(
            request_id=request_id,
            request_id_text=str(request_id),
            endpoint=endpoint,
            started_wall=time.time(),
            started=time.perf_counter(),
        )

    async def admitted(self) -> None:
        """Returns once the request is admitted; raises its refusal if the overlapping admission refused it."""
        if self.admission is not None:
            await self.admission

    async def unless_refused(self, work: Coroutine[Any, Any, T]) -> T:
        """`work` (the upstream request), cut short if the overlapping admission refuses meanwhile: the client gets
        the refusal at once, and the upstream sees its request cancelled."""
        admission = self.admission
        if admission is None:
            return await work
        if admission.done():
            if admission.cancelled() or admission.exception() is not None:
                work.close()
                await admission  # raises the refusal
            return await work
        running = asyncio.ensure_future(work)

        def stop(decided: asyncio.Task[None]) -> None:
            if decided.cancelled() or decided.exception() is not None:
                running.cancel()

        admission.add_done_callback(stop)
        try:
            return await running
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if running.cancelled() and admission.done() and task is not None and not task.cancelling():
                await admission  # the refusal stopped it: raise that instead
            raise
        finally:
            admission.remove_done_callback(stop)

    @property
    def refused(self) -> bool:
        """An overlapping admission that did not admit: refused, failed, cancelled or still running (the handler
        was cancelled meanwhile)."""
        task = self.admission
        return task is not None and (not task.done() or task.cancelled() or task.exception() is not None)

    def mark_first_token(self) -> None:
        if self.first_token is None:
            self.first_token = time.perf_counter()

    @property
    def first_token_ms(self) -> float | None:
        return (self.first_token - self.started) * 1000 if self.first_token is not None else None

    @property
    def duration_ms(self) -> float:
        end = self.ended if self.ended is not None else time.perf_counter()
        return (end - self.started) * 1000
