"""Coalescing: calls made by many requests in one turn of the event loop go out together.

With 32 requests in flight, a dozen may finish (or be admitted) in the same turn of the loop; one Redis pipeline
for all of them costs one round trip and a fraction of the client-side work of a dozen calls. A lone request is
not delayed: the batch is sent at the end of the current turn (`call_soon`), not after a timer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


class Coalescer(Generic[Item, Result]):
    def __init__(self, send: Callable[[list[Item]], Awaitable[Sequence[Result]]]) -> None:
        """`send` gets the batch and returns one result per item, in order (or raises for all of them)."""
        self._send = send
        self._items: list[Item] = []
        self._futures: list[asyncio.Future[Result]] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def submit(self, item: Item) -> Result:
        loop = asyncio.get_running_loop()
        if not self._items:
            loop.call_soon(self._flush)
        future: asyncio.Future[Result] = loop.create_future()
        self._items.append(item)
        self._futures.append(future)
        return await future

    def _flush(self) -> None:
        items, futures = self._items, self._futures
        self._items, self._futures = [], []
        task = asyncio.get_running_loop().create_task(self._deliver(items, futures))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _deliver(self, items: list[Item], futures: list[asyncio.Future[Result]]) -> None:
        try:
            results = await self._send(items)
        except BaseException as exc:  # every caller of the batch sees the failure (cancellation included)
            for future in futures:
                if not future.done():
                    future.set_exception(exc if isinstance(exc, Exception) else asyncio.CancelledError())
            if not isinstance(exc, Exception):
                raise
            return
        for future, result in zip(futures, results, strict=True):
            if not future.done():
                future.set_result(result)
