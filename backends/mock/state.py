"""Per-process mutable state: the per-model schedulers, counters, logs and control-plane settings.

With ``--workers N`` every worker process has its own copy, so ``/mock/stats``,
``/mock/requests``, faults, load overrides and ``/metrics`` describe (and affect) only
the worker that happens to answer the call.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from .config import MockConfig
from .faults import FaultList

__all__ = ["LOG_SIZE", "Engine", "Job", "LoadOverride", "MockState"]

#: How many requests / cancellations the control plane remembers.
LOG_SIZE = 1000
#: vLLM's default KV block size; the prefix cache hits whole blocks only.
PREFIX_BLOCK = 16
#: Blocks remembered per model by the prefix-cache simulation (LRU).
PREFIX_CACHE_BLOCKS = 65536
FINISH_REASONS = ("stop", "length", "abort")


class Engine:
    """One model's "engine": at most ``max_num_seqs`` requests run, the rest wait in FIFO order.

    It also keeps the model's Prometheus counters and a block-hash prefix cache, so
    ``vllm:prefix_cache_hits_total`` rises when prompts share a prefix (multi-turn chats).
    """

    __slots__ = (
        "_notify",
        "_prefix",
        "_waiting",
        "finished",
        "generation_tokens",
        "max_num_seqs",
        "name",
        "prefix_hits",
        "prefix_queries",
        "prompt_tokens",
        "running",
    )

    def __init__(self, name: str, max_num_seqs: int, notify: Callable[[], None]) -> None:
        self.name = name
        self.max_num_seqs = max_num_seqs
        self._notify = notify
        self.running = 0
        self._waiting: deque[asyncio.Future[None]] = deque()
        self._prefix: OrderedDict[int, None] = OrderedDict()
        self.reset_counters()

    def reset_counters(self) -> None:
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.prefix_queries = 0
        self.prefix_hits = 0
        self.finished = dict.fromkeys(FINISH_REASONS, 0)
        self._prefix.clear()

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    async def acquire(self) -> None:
        """Wait for a sequence slot (FIFO)."""
        if self.running < self.max_num_seqs and not self._waiting:
            self.running += 1
            self._notify()
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append(fut)
        self._notify()
        try:
            await fut
        except asyncio.CancelledError:
            if fut.cancelled():
                with contextlib.suppress(ValueError):  # O(n), but only when a waiting client hangs up
                    self._waiting.remove(fut)
                self._notify()
            else:
                self.release()  # the slot was handed over just before the cancellation landed
            raise

    def release(self) -> None:
        """Free a slot, handing it straight to the oldest waiter (``running`` stays the same then)."""
        while self._waiting:
            fut = self._waiting.popleft()
            if not fut.done():
                fut.set_result(None)
                self._notify()
                return
        self.running -= 1
        self._notify()

    def admit(self, tokens: Sequence[Any]) -> None:
        """Account a prompt's prefill: prompt tokens and prefix-cache queries/hits over full blocks."""
        count = len(tokens)
        self.prompt_tokens += count
        self.prefix_queries += count
        cache = self._prefix
        chained = 0
        hitting = True
        for start in range(0, count - count % PREFIX_BLOCK, PREFIX_BLOCK):
            # Chain the hashes so a block only hits when everything before it matched too.
            chained = hash((chained, *tokens[start : start + PREFIX_BLOCK]))
            if hitting and chained in cache:
                cache.move_to_end(chained)
                self.prefix_hits += PREFIX_BLOCK
            else:
                hitting = False
                cache[chained] = None
        while len(cache) > PREFIX_CACHE_BLOCKS:
            cache.popitem(last=False)


@dataclass(slots=True)
class Job:
    """One inference request in flight: what a cancellation needs to record."""

    request_id: str | None
    #: Completion tokens sent to (streaming) or generated for (non-streaming) the client so far.
    sent: int = 0


@dataclass(slots=True)
class LoadOverride:
    running: int | None = None
    waiting: int | None = None
    kv_cache_usage_perc: float | None = None


@dataclass(slots=True)
class _Waiter:
    predicate: Callable[[], bool]
    future: asyncio.Future[None] = field(repr=False)


class MockState:
    """Everything one server process remembers."""

    def __init__(self, config: MockConfig) -> None:
        self.config = config
        self.started = int(time.time())
        self._waiters: list[_Waiter] = []
        self.engines = {model: Engine(model, config.max_num_seqs, self.notify) for model in config.models}
        self.faults = FaultList()
        #: Load overrides for /metrics: per model name, ``None`` = every model.
        self.load: dict[str | None, LoadOverride] = {}
        self.requests_log: deque[dict[str, Any]] = deque(maxlen=LOG_SIZE)
        self.cancelled_log: deque[dict[str, Any]] = deque(maxlen=LOG_SIZE)
        #: Requests hanging right now in a ``stall`` / ``stall_after`` fault (a gauge: never reset).
        self.stalled = 0
        self.reset_stats()

    # --- stats ---

    def reset_stats(self) -> None:
        self.requests = 0
        self.completed = 0
        self.cancelled = 0
        self.dropped = 0
        self.errors = 0
        self.generated_tokens = 0
        self.cancelled_log.clear()
        self.notify()

    def stats(self) -> dict[str, int]:
        return {
            "requests": self.requests,
            "completed": self.completed,
            "cancelled": self.cancelled,
            "dropped": self.dropped,
            "errors": self.errors,
            "running": sum(e.running for e in self.engines.values()),
            "waiting": sum(e.waiting for e in self.engines.values()),
            "stalled": self.stalled,
            "generated_tokens": self.generated_tokens,
        }

    def log_request(self, request: web.BaseRequest, body: Any) -> None:
        self.requests_log.append(
            {
                "path": request.path,
                "method": request.method,
                # Lower-cased names so a test can look a header up without caring how it was sent.
                "headers": {k.lower(): v for k, v in request.headers.items()},
                "body": body,
            }
        )

    def record_completed(self, engine: Engine | None, finish_reasons: Sequence[str], tokens: int) -> None:
        self.completed += 1
        self.generated_tokens += tokens
        if engine is not None:
            engine.generation_tokens += tokens
            for reason in finish_reasons:
                engine.finished[reason] += 1
        self.notify()

    def record_cancelled(self, engine: Engine | None, job: Job, sequences: int) -> None:
        self.cancelled += 1
        self.generated_tokens += job.sent
        self.cancelled_log.append({"request_id": job.request_id, "generated_tokens": job.sent})
        if engine is not None:
            engine.generation_tokens += job.sent
            engine.finished["abort"] += sequences
        self.notify()

    def record_dropped(self, engine: Engine | None, job: Job) -> None:
        self.dropped += 1
        self.generated_tokens += job.sent
        if engine is not None:
            engine.generation_tokens += job.sent
        self.notify()

    def reset(self) -> None:
        """Everything back to a fresh start (in-flight requests keep running)."""
        self.requests_log.clear()
        self.faults.clear()
        self.load.clear()
        for engine in self.engines.values():
            engine.reset_counters()
        self.reset_stats()

    # --- waiting on conditions (for in-process tests; no polling, no sleeps) ---

    def notify(self) -> None:
        """Called on every change of the stats; cheap when nobody waits."""
        if not self._waiters:
            return
        still: list[_Waiter] = []
        for waiter in self._waiters:
            if waiter.future.done():
                continue
            if waiter.predicate():
                waiter.future.set_result(None)
            else:
                still.append(waiter)
        self._waiters = still

    async def wait_for(self, predicate: Callable[[], bool], within: float = 5.0) -> None:
        """Return once ``predicate()`` holds (checked after every state change); ``TimeoutError`` if not."""
        if predicate():
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(_Waiter(predicate, future))
        async with asyncio.timeout(within):
            await future
