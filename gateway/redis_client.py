"""The Redis client the gateway uses: redis-py's asyncio client, with commands packed by hiredis in C.

redis-py's asyncio connection packs every command in Python, joining bytes once per argument (quadratic in the
argument count); the limiter's scripts take dozens of arguments on every request. hiredis (a dependency) packs
the same bytes in C.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
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


class _RawConnection:
    __slots__ = ("parser", "reader", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.parser = hiredis.Reader(replyError=ResponseError)


class RawPipelineClient:
    """Just enough of a Redis client for the hot path's pipelines: commands packed by hiredis, written at once,
    replies parsed by hiredis, no per-command Python machinery. (redis-py's pipeline spends more per request than
    everything else the limiter does.) Plain `redis://` URLs only; anything else uses redis-py."""

    def __init__(self, url: str) -> None:
        options = parse_url(url)  # type: ignore[no-untyped-call]
        self._host = options.get("host", "127.0.0.1")
        self._port = int(options.get("port", 6379))
        self._password = options.get("password")
        self._username = options.get("username")
        self._db = int(options.get("db", 0) or 0)
        self._idle: list[_RawConnection] = []

    @staticmethod
    def supports(url: str) -> bool:
        return url.startswith("redis://") and hiredis is not None

    async def _connect(self) -> _RawConnection:
        reader, writer = await asyncio.open_connection(self._host, self._port)
        connection = _RawConnection(reader, writer)
        setup: list[tuple[Any, ...]] = []
        if self._password:
            setup.append(("AUTH", self._username, self._password) if self._username else ("AUTH", self._password))
        if self._db:
            setup.append(("SELECT", self._db))
        if setup:
            for reply in await self._roundtrip(connection, setup):
                if isinstance(reply, Exception):
                    writer.close()
                    raise reply
        return connection

    async def _roundtrip(self, connection: _RawConnection, commands: Sequence[tuple[Any, ...]]) -> list[Any]:
        connection.writer.write(b"".join(hiredis.pack_command(command) for command in commands))
        replies: list[Any] = []
        while len(replies) < len(commands):
            reply = connection.parser.gets()
            if reply is False:
                data = await connection.reader.read(65536)
                if not data:
                    raise RedisConnectionError("Redis closed the connection")
                connection.parser.feed(data)
                continue
            if isinstance(reply, ResponseError) and str(reply).startswith("NOSCRIPT"):
                reply = NoScriptError(str(reply))
            replies.append(reply)
        return replies

    async def execute(self, commands: Sequence[tuple[Any, ...]]) -> list[Any]:
        reused = bool(self._idle)
        connection = self._idle.pop() if reused else await self._connect()
        try:
            replies = await self._roundtrip(connection, commands)
        except (OSError, RedisConnectionError):
            connection.writer.close()
            if not reused:
                raise
            # A pooled connection that went stale (Redis restarted): the others are too. Once more, afresh.
            self.close()
            connection = await self._connect()
            try:
                replies = await self._roundtrip(connection, commands)
            except BaseException:
                connection.writer.close()
                raise
        except BaseException:
            connection.writer.close()  # a half-read reply would poison the next pipeline: never reuse it
            raise
        self._idle.append(connection)
        return replies

    def close(self) -> None:
        for connection in self._idle:
            connection.writer.close()
        self._idle.clear()


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
        self._waiters: list[tuple[int, int, asyncio.Future[list[Any]]]] = []
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
        task = asyncio.get_running_loop().create_task(self._send(commands, waiters))
        self._flushes.add(task)
        task.add_done_callback(self._flushes.discard)

    async def _send(
        self, commands: list[tuple[Any, ...]], waiters: list[tuple[int, int, asyncio.Future[list[Any]]]]
    ) -> None:
        try:
            async with asyncio.timeout(self._timeout):
                results = await self._pipeline(commands)
        except BaseException as exc:  # every caller of this pipeline hears of its failure
            failure: BaseException = exc
            if isinstance(exc, OSError | TimeoutError):
                failure = RedisConnectionError(f"{type(exc).__name__}: {exc}")
            for _, _, future in waiters:
                if not future.done():
                    future.set_exception(
                        failure if isinstance(failure, Exception) else RedisConnectionError("cancelled")
                    )
            if not isinstance(exc, Exception):
                raise
            return
        for start, count, future in waiters:
            if not future.done():
                future.set_result(results[start : start + count])
