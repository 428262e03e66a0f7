"""Deployment concurrency slots while Redis fails: a cancellation (a client hanging up, a shutdown) must end the
call or the loop it reaches, even when redis-py reports it as the failing call's connection error.

Redis here is a real TCP server that accepts each connection and closes it at once (a dying or restarting Redis);
each case cancels at a different point of the failing call (a number of event loop turns after it began), since
redis-py turns a cancellation into a ConnectionError only at some of them.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import pytest
import redis.asyncio as aioredis

from gateway.redis_client import make_redis
from gateway.routing.slots import DeploymentSlots
from gateway.routing.table import DeploymentRuntime
from gateway.settings import Deployment, Timeouts
from tests.harness import ClosingServer

TURNS = range(16)  # event loop turns between the start of the failing call and its cancellation


@pytest.fixture
async def failing_redis() -> AsyncIterator[tuple[aioredis.Redis, ClosingServer]]:
    server = ClosingServer(wanted=1)
    listener = await asyncio.start_server(server.handle, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    client = make_redis(f"redis://127.0.0.1:{port}/0", timeout=1.0)
    yield client, server
    await client.aclose()
    listener.close()


def deployment() -> DeploymentRuntime:
    config = Deployment(name="capped", base_url="http://127.0.0.1:9/v1", max_concurrency=4)
    return DeploymentRuntime(config=config, model="m", timeouts=Timeouts(), upstream_model="m")


async def cancelled_after(
    turns: int, start: Callable[[], Coroutine[Any, Any, object]], began: asyncio.Event | None = None
) -> asyncio.Task[object] | None:
    """Start `start()`, wait for `began`, let `turns` turns of the loop pass, cancel; the task once it ended (or did
    not within 5 s), or None if it had ended before the cancellation."""
    task = asyncio.create_task(start())
    if began is not None:
        async with asyncio.timeout(10):
            await began.wait()
    for _ in range(turns):
        await asyncio.sleep(0)
    if not task.cancel():
        return None
    await asyncio.wait([task], timeout=5)
    return task


@pytest.mark.parametrize("turns", TURNS)
async def test_a_hang_up_while_acquiring_a_slot_is_not_turned_into_an_admission(
    turns: int, failing_redis: tuple[aioredis.Redis, ClosingServer]
) -> None:
    client, _ = failing_redis
    slots = DeploymentSlots(client, lease_seconds=3, timeout=1.0)
    capped = deployment()
    task = await cancelled_after(turns, lambda: slots.try_acquire(capped, "request-1"))
    if task is None:
        return  # it had failed over to this process's own count before the cancellation: nothing to check
    assert task.done()
    assert task.cancelled(), "a request whose client hung up took a slot and went on"
    assert capped.in_flight == 0


@pytest.mark.parametrize("turns", TURNS)
async def test_a_hang_up_while_releasing_a_slot_ends_the_request(
    turns: int, failing_redis: tuple[aioredis.Redis, ClosingServer]
) -> None:
    client, _ = failing_redis
    slots = DeploymentSlots(client, lease_seconds=3, timeout=1.0)
    capped = deployment()
    slots._held[(capped.name, "request-1")] = capped
    task = await cancelled_after(turns, lambda: slots.release(capped, "request-1"))
    if task is None:
        return
    assert task.done()
    assert task.cancelled(), "a request whose client hung up went on (to a retry elsewhere)"


@pytest.mark.parametrize("turns", TURNS)
async def test_the_lease_renewal_loop_ends_when_cancelled_during_a_failing_renewal(
    turns: int, failing_redis: tuple[aioredis.Redis, ClosingServer]
) -> None:
    client, server = failing_redis
    slots = DeploymentSlots(client, lease_seconds=1.5, timeout=1.0)
    capped = deployment()
    slots._held[(capped.name, "request-1")] = capped  # a request in flight: its lease is renewed
    task = await cancelled_after(turns, slots.renew_forever, server.enough)
    assert task is not None
    assert task.done(), "the renewal loop outlived its cancellation (a shutdown would never end)"
    assert task.cancelled()
