"""Fixtures of the unit tests that run against a real Redis of their own."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.harness import RedisServer
from tests.limiters import Workers


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A redis-server on a free port for the module's tests (test_redis_client.py starts one per test instead)."""
    server = RedisServer(Path(tmp_path_factory.mktemp("redis")))
    server.start()
    yield server
    server.stop()


@pytest.fixture
async def workers(redis_server: RedisServer) -> AsyncIterator[Workers]:
    """Gateway workers' limiters sharing the module's Redis (tests/limiters.py)."""
    pool = Workers(redis_server.url)
    yield pool
    await pool.close()
