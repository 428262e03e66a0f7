"""The Redis client the gateway uses: redis-py's asyncio client, with commands packed by hiredis in C.

redis-py's asyncio connection packs every command in Python, joining bytes once per argument (quadratic in the
argument count); the limiter's scripts take dozens of arguments on every request. hiredis (a dependency) packs
the same bytes in C.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.connection import Connection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.connection import parse_url
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError

_hiredis_pack: Callable[[tuple[Any, ...]], bytes] | None
try:
    import hiredis
    from hiredis import pack_command as _hiredis_pack
except ImportError:  # pragma: no cover - hiredis is a dependency; the pure-Python packer still works
    _hiredis_pack = None
    hiredis = None  # type: ignore[assignment]


class _HiredisPackingConnection(Connection):
    def pack_command(self, *args: Any) -> list[bytes]:
        if _hiredis_pack is None or not isinstance(args[0], str | bytes) or " " in str(args[0]):
            return super().pack_command(*args)
        return [_hiredis_pack(args)]


def make_redis(url: str, *, timeout: float, connect_timeout: float | None = None) -> aioredis.Redis:
    return aioredis.from_url(
        url,
        socket_timeout=timeout,
        socket_connect_timeout=connect_timeout or timeout,
        max_connections=512,
        # One immediate retry on a fresh connection: pooled connections go stale when Redis restarts.
        retry=Retry(NoBackoff(), 1),
        connection_class=_HiredisPackingConnection,
    )


class _Batch:
    __slots__ = ("count", "future", "replies")

    def __init__(self, count: int, future: asyncio.Future[list[Any]]) -> None:
        self.count = count
        self.future = future
        self.replies: list[Any] = []


class _RedisProtocol(asyncio.Protocol):
    """One connection: pipelines are written as they come and answered in order, each reply parsed by hiredis as
    its bytes arrive and handed to its pipeline's future from the transport's callback (no reader task)."""

    def __init__(self) -> None:
        self.parser = hiredis.Reader(replyError=ResponseError)
        self.waiting: deque[_Batch] = deque()
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.used = False  # has answered a pipeline: a failure now may mean Redis restarted meanwhile

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.parser.feed(data)
        while self.waiting:
            batch = self.waiting[0]
            while len(batch.replies) < batch.count:
                try:
                    reply = self.parser.gets()
                except hiredis.ProtocolError:  # not Redis on the other end, or a corrupted stream
                    self.fail(RedisConnectionError("Redis protocol error: not a Redis reply"))
                    return
                if reply is False:
                    return
                if isinstance(reply, ResponseError) and str(reply).startswith("NOSCRIPT"):
                    reply = NoScriptError(str(reply))
                batch.replies.append(reply)
            self.waiting.popleft()
            self.used = True
            if not batch.future.done():
                batch.future.set_result(batch.replies)

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(RedisConnectionError(f"Redis closed the connection ({type(exc).__name__ if exc else 'EOF'})"))

    def send(self, payload: bytes, count: int) -> asyncio.Future[list[Any]]:
        future: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        assert self.transport is not None
        self.waiting.append(_Batch(count, future))
        self.transport.write(payload)
        return future

    def fail(self, error: Exception) -> None:
        """Every pipeline still waiting fails, and the connection is done: a late reply would answer the wrong
        pipeline."""
        self.closed = True
        if self.transport is not None:
            self.transport.close()
        while self.waiting:
            future = self.waiting.popleft().future
            if not future.done():
                future.set_exception(error)


def reraise_cancellation(error: BaseException) -> None:
    """Call where a Redis error is caught and survived. redis-py can report a cancellation that reached it in the
    middle of a failing call as that call's connection error, and a loop that then carries on would outlive its own
    cancellation (a shutdown that never ends)."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError from error


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


def pack(commands: Sequence[tuple[Any, ...]]) -> bytes:
    return b"".join(hiredis.pack_command(command) for command in commands)


class RawPipelineClient:
    """Just enough of a Redis client for the hot path's pipelines: one connection, commands packed by hiredis,
    written at once, replies parsed by hiredis in the transport's callback, no per-command Python machinery.
    (redis-py's pipeline spends more per request than everything else the limiter does.) Plain `redis://` URLs
    only; anything else uses redis-py."""

    def __init__(self, url: str) -> None:
        options = parse_url(url)  # type: ignore[no-untyped-call]
        self._host = options.get("host", "127.0.0.1")
        self._port = int(options.get("port", 6379))
        self._password = options.get("password")
        self._username = options.get("username")
        self._db = int(options.get("db", 0) or 0)
        self._protocol: _RedisProtocol | None = None
        self._connecting: asyncio.Future[_RedisProtocol] | None = None

    @staticmethod
    def supports(url: str) -> bool:
        return url.startswith("redis://") and hiredis is not None

    def ready(self) -> _RedisProtocol | None:
        """The open connection, if there is one."""
        protocol = self._protocol
        return protocol if protocol is not None and not protocol.closed else None

    async def connection(self) -> _RedisProtocol:
        protocol = self.ready()
        if protocol is not None:
            return protocol
        if self._connecting is None or self._connecting.done():
            self._connecting = asyncio.ensure_future(self._connect())
            # Its callers may have given up (timeout) before it failed: nobody else would read the error.
            self._connecting.add_done_callback(_retrieve)
        return await asyncio.shield(self._connecting)

    async def _connect(self) -> _RedisProtocol:
        _, protocol = await asyncio.get_running_loop().create_connection(_RedisProtocol, self._host, self._port)
        setup: list[tuple[Any, ...]] = []
        if self._password:
            setup.append(("AUTH", self._username, self._password) if self._username else ("AUTH", self._password))
        if self._db:
            setup.append(("SELECT", self._db))
        if setup:
            for reply in await protocol.send(pack(setup), len(setup)):
                if isinstance(reply, Exception):
                    protocol.fail(RedisConnectionError("connection setup failed"))
                    raise reply
        self._protocol = protocol
        return protocol

    async def execute(self, commands: Sequence[tuple[Any, ...]]) -> list[Any]:
        payload = pack(commands)
        protocol = await self.connection()
        try:
            return await protocol.send(payload, len(commands))
        except RedisConnectionError:
            if not protocol.used:
                raise
            # A connection that had worked went away (Redis restarted): once more, afresh.
            return await (await self.connection()).send(payload, len(commands))

    def close(self) -> None:
        if self._protocol is not None:
            self._protocol.fail(RedisConnectionError("client closed"))
        self._protocol = None


_Waiters = list[tuple[int, int, asyncio.Future[list[Any]]]]  # (start, count, caller) per caller


class Pipeliner:
    """Every hot-path Redis command issued in one turn of the event loop goes out in one pipeline.

    With 32 requests in flight, many are admitted or finish in the same turn of the loop: their admission scripts,
    settlements and usage records then cost one round trip and one pipeline's client-side work between them. A lone
    request is not delayed: the pipeline is sent at the end of the current turn (`call_soon`), not after a timer.
    Results come back per caller, in order, errors as values (like `execute(raise_on_error=False)`).
    """

    def __init__(self, client: aioredis.Redis, url: str | None = None, timeout: float = 1.0) -> None:
        self._client = client
        self._raw = RawPipelineClient(url) if url and RawPipelineClient.supports(url) else None
        self._timeout = timeout
        self._commands: list[tuple[Any, ...]] = []
        self._waiters: _Waiters = []
        self._flushes: set[asyncio.Task[None]] = set()

    async def execute(self, commands: Sequence[tuple[Any, ...]]) -> list[Any]:
        loop = asyncio.get_running_loop()
        if not self._commands:
            loop.call_soon(self._flush)
        future: asyncio.Future[list[Any]] = loop.create_future()
        self._waiters.append((len(self._commands), len(commands), future))
        self._commands.extend(commands)
        return await future

    async def _pipeline(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        if self._raw is not None:
            return await self._raw.execute(commands)
        async with self._client.pipeline(transaction=False) as pipe:
            for command in commands:
                pipe.execute_command(*command)
            return list(await pipe.execute(raise_on_error=False))

    def close(self) -> None:
        if self._raw is not None:
            self._raw.close()

    def _flush(self) -> None:
        commands, waiters = self._commands, self._waiters
        self._commands, self._waiters = [], []
        loop = asyncio.get_running_loop()
        protocol = self._raw.ready() if self._raw is not None else None
        if protocol is not None:
            # The usual case: written now, answered from the transport's callback; no task, one timer.
            sent = protocol.send(pack(commands), len(commands))
            timer = loop.call_later(self._timeout, _overdue, protocol, sent, self._timeout)
            sent.add_done_callback(partial(self._answered, commands, waiters, timer, protocol))
            return
        self._spawn(commands, waiters)

    def _spawn(self, commands: list[tuple[Any, ...]], waiters: _Waiters) -> None:
        task = asyncio.get_running_loop().create_task(self._send(commands, waiters))
        self._flushes.add(task)
        task.add_done_callback(self._flushes.discard)

    def _answered(
        self,
        commands: list[tuple[Any, ...]],
        waiters: _Waiters,
        timer: asyncio.TimerHandle,
        protocol: _RedisProtocol,
        sent: asyncio.Future[list[Any]],
    ) -> None:
        timer.cancel()
        error = sent.exception() if not sent.cancelled() else RedisConnectionError("cancelled")
        if error is None:
            _deliver(waiters, sent.result())
        elif isinstance(error, RedisConnectionError) and not isinstance(error, _Overdue) and protocol.used:
            self._spawn(commands, waiters)  # a connection that had worked went away (Redis restarted): afresh
        else:
            _fail(waiters, error)

    async def _send(self, commands: list[tuple[Any, ...]], waiters: _Waiters) -> None:
        try:
            async with asyncio.timeout(self._timeout):
                results = await self._pipeline(commands)
        except BaseException as exc:  # every caller of this pipeline hears of its failure
            if isinstance(exc, TimeoutError) and self._raw is not None:
                self._raw.close()  # its replies are overdue: a late one would answer the wrong pipeline
            failure: BaseException = exc
            if isinstance(exc, OSError | TimeoutError):
                failure = RedisConnectionError(f"{type(exc).__name__}: {exc}")
            _fail(waiters, failure)
            if not isinstance(exc, Exception):
                raise
            return
        _deliver(waiters, results)


class _Overdue(RedisConnectionError):
    """No reply within the timeout: the connection is given up, and the pipeline is not sent again."""


def _overdue(protocol: _RedisProtocol, sent: asyncio.Future[list[Any]], timeout: float) -> None:
    if not sent.done():
        protocol.fail(_Overdue(f"TimeoutError: no reply from Redis within {timeout} s"))


def _deliver(waiters: _Waiters, results: list[Any]) -> None:
    for start, count, future in waiters:
        if not future.done():
            future.set_result(results[start : start + count])


def _fail(waiters: _Waiters, error: BaseException) -> None:
    if not isinstance(error, Exception):  # a cancellation: the callers hear of a lost pipeline, not a cancel
        error = RedisConnectionError("cancelled")
    for _, _, future in waiters:
        if not future.done():
            future.set_exception(error)
