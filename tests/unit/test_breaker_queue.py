"""The circuit breaker's states and the fair queue's order."""

from __future__ import annotations

import pytest

from gateway.breaker import BreakerState, CircuitBreaker
from gateway.routing.slots import FairQueue, QueueFull


def test_breaker_opens_after_the_threshold_and_probes_once_half_open(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [100.0]
    monkeypatch.setattr("gateway.breaker.time.monotonic", lambda: clock[0])
    breaker = CircuitBreaker(threshold=3, cooldown=10)
    for _ in range(2):
        breaker.failure()
        assert breaker.state is BreakerState.CLOSED and breaker.allow()
    breaker.failure()
    assert breaker.state is BreakerState.OPEN and not breaker.allow()
    clock[0] += 10
    assert breaker.state is BreakerState.HALF_OPEN
    assert breaker.allow() and not breaker.allow()  # one probe at a time
    breaker.failure()  # the probe failed: open again for a whole cooldown
    assert breaker.state is BreakerState.OPEN
    clock[0] += 10
    assert breaker.allow()
    breaker.success()
    assert breaker.state is BreakerState.CLOSED and breaker.failures == 0


async def test_queue_serves_teams_round_robin() -> None:
    queue = FairQueue(max_waiting=100)
    named = [(f"flood-{i}", queue.enqueue("flood", 0)) for i in range(10)]
    named.append(("quiet-0", queue.enqueue("quiet", 0)))
    named += [(f"flood-{i}", queue.enqueue("flood", 0)) for i in range(10, 12)]
    order: list[str] = []
    while queue.wake_next():
        order.extend(name for name, future in named if future.done() and name not in order)
    # The quiet team's single request is served second, however many the flooding team queued before it.
    assert order.index("quiet-0") == 1
    assert [name for name in order if name.startswith("flood")] == [f"flood-{i}" for i in range(12)]


async def test_priorities_first_then_round_robin() -> None:
    queue = FairQueue(max_waiting=10)
    low = queue.enqueue("batch", 0)
    high = queue.enqueue("interactive", 5)
    assert queue.wake_next() and high.done() and not low.done()


async def test_queue_is_bounded_and_a_requeued_waiter_keeps_its_place() -> None:
    queue = FairQueue(max_waiting=2)
    first = queue.enqueue("a", 0)
    second = queue.enqueue("a", 0)
    with pytest.raises(QueueFull):
        queue.enqueue("b", 0)
    assert queue.wake_next() and first.done()
    again = queue.enqueue("a", 0, front=True)  # woke, found no slot: back to the front
    assert queue.wake_next() and again.done() and not second.done()
    queue.remove(second)
    assert queue.size == 0


async def test_a_woken_waiter_that_finds_no_slot_keeps_its_turn() -> None:
    queue = FairQueue(max_waiting=10)
    quiet = queue.enqueue("quiet", 0)
    flood = [queue.enqueue("flood", 0) for _ in range(3)]
    assert queue.wake_next() and quiet.done()
    # The slot it was woken for was gone: it goes back first of the round, ahead of the other team.
    again = queue.enqueue("quiet", 0, front=True)
    assert queue.wake_next() and again.done() and not any(future.done() for future in flood)
