"""gateway.redis_client.Pipeliner over the raw client: many callers' commands in one pipeline per loop turn, each
caller's replies its own, in order, on one connection; a restarted Redis is reconnected to, an outage is an error."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from gateway.redis_client import Pipeliner, make_redis
from tests.harness import RedisServer


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


async def test_callers_get_their_own_replies_in_order(redis_server: RedisServer) -> None:
    client = make_redis(redis_server.url, timeout=2)
    pipeliner = Pipeliner(client, redis_server.url, timeout=2)
    try:

        async def caller(index: int) -> list[object]:
            key = f"counter:{index}"
            return await pipeliner.execute([("INCRBY", key, index), ("INCRBY", key, 1), ("GET", key), ("BOGUS",)])

        for _round in range(3):  # later rounds go straight down the open connection
            results = await asyncio.gather(*(caller(index) for index in range(50)))
            for index, (first, second, value, error) in enumerate(results):
                assert second == first + 1 and int(value) == second  # type: ignore[call-overload, operator]
                assert first == index * (_round + 1) + _round  # type: ignore[operator]
                assert isinstance(error, ResponseError)  # an error is that caller's value, not everyone's failure
        assert int((await client.info("clients"))["connected_clients"]) <= 2  # one pipeline connection (+ redis-py's)
    finally:
        pipeliner.close()
        await client.aclose()


async def test_a_restarted_redis_is_reconnected_and_a_stopped_one_is_an_error(redis_server: RedisServer) -> None:
    client = make_redis(redis_server.url, timeout=1)
    pipeliner = Pipeliner(client, redis_server.url, timeout=1)
    try:
        assert await pipeliner.execute([("SET", "k", "v")]) == [b"OK"]
        redis_server.stop()
        with pytest.raises(RedisConnectionError):
            await pipeliner.execute([("GET", "k")])
        redis_server.start()  # keeps nothing on disk: a fresh, empty Redis
        assert await pipeliner.execute([("GET", "k"), ("PING",)]) == [None, b"PONG"]
    finally:
        pipeliner.close()
        await client.aclose()


async def test_a_server_that_is_not_redis_is_a_connection_error_without_a_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(65536)
        writer.write(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")
        await writer.drain()
        writer.close()
        await writer.wait_closed()

    server = await asyncio.start_server(http, "127.0.0.1", 0)
    url = f"redis://127.0.0.1:{server.sockets[0].getsockname()[1]}/0"
    client = make_redis(url, timeout=2)
    pipeliner = Pipeliner(client, url, timeout=2)
    try:
        with pytest.raises(RedisConnectionError, match="protocol error"):
            await pipeliner.execute([("PING",)])
        assert not [record for record in caplog.records if record.levelname in ("ERROR", "CRITICAL")]
    finally:
        pipeliner.close()
        await client.aclose()
        server.close()
        await server.wait_closed()
