"""The Redis client the gateway uses: redis-py's asyncio client, with commands packed by hiredis in C.

redis-py's asyncio connection packs every command in Python, joining bytes once per argument (quadratic in the
argument count); the limiter's scripts take dozens of arguments on every request. hiredis (a dependency) packs
the same bytes in C.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.connection import Connection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

_hiredis_pack: Callable[[tuple[Any, ...]], bytes] | None
try:
    from hiredis import pack_command as _hiredis_pack
except ImportError:  # pragma: no cover - hiredis is a dependency; the pure-Python packer still works
    _hiredis_pack = None


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
