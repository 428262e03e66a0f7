"""A private redis-server on a free port for the gateway: nothing shared; its append-only file (the production
setting the gateway asks for) lives in the temp dir and goes with it."""

from __future__ import annotations

from pathlib import Path

import redis
from procs import Service, free_port, require_tool


def start_redis(tmp: Path) -> Service:
    server = require_tool("redis-server", "install Debian's redis-server, or pass --redis-url")
    port = free_port()
    service = Service.start(
        "redis",
        [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes", "--dir", str(tmp)],
        log_path=tmp / "redis.log",
        url=f"redis://127.0.0.1:{port}/0",
    )
    service.wait_for(lambda: _pings(service.url), timeout=10, what=f"redis at {service.url}")
    return service


def _pings(url: str) -> bool:
    try:
        with redis.Redis.from_url(url, socket_timeout=0.5) as client:
            return bool(client.ping())
    except redis.RedisError:
        return False


def command_calls(url: str) -> dict[str, int]:
    """Calls per command so far (`INFO commandstats`; commands run inside Lua scripts are counted too)."""
    with redis.Redis.from_url(url, socket_timeout=2) as client:
        stats = client.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(values["calls"]) for name, values in stats.items()}


SCRIPT_COMMANDS = frozenset({"evalsha", "eval", "evalsha_ro", "eval_ro", "fcall", "fcall_ro"})


def calls_between(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    delta = {name: count - before.get(name, 0) for name, count in after.items()}
    return dict(sorted(((name, count) for name, count in delta.items() if count), key=lambda item: -item[1]))
