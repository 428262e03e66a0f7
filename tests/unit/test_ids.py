"""gateway.ids: UUIDv7 layout, monotonic ids within a process, and the time they carry."""

from __future__ import annotations

import itertools
import time
import uuid
from types import SimpleNamespace

import pytest

from gateway import ids


@pytest.fixture
def frozen_clock(monkeypatch: pytest.MonkeyPatch) -> SimpleNamespace:
    """A clock that stands still unless the test moves it; the module's counter state is restored afterwards."""
    clock = SimpleNamespace(ns=time.time_ns())
    monkeypatch.setattr(ids, "time", SimpleNamespace(time_ns=lambda: clock.ns))
    monkeypatch.setattr(ids, "_last_ms", 0)
    monkeypatch.setattr(ids, "_sequence", 0)
    return clock


def test_version_and_variant_bits() -> None:
    for _ in range(100):
        value = ids.uuid7()
        assert value.version == 7
        assert value.variant == uuid.RFC_4122
        assert (value.int >> 76) & 0xF == 0x7
        assert (value.int >> 62) & 0b11 == 0b10


def test_uuid7_time_close_to_now() -> None:
    before = time.time()
    value = ids.uuid7()
    after = time.time()
    assert before - 0.002 <= ids.uuid7_time(value) <= after + 0.002


def test_monotonic_with_the_real_clock() -> None:
    values = [ids.uuid7() for _ in range(10_000)]
    assert all(a < b for a, b in itertools.pairwise(values))
    assert len(set(values)) == len(values)


def test_monotonic_for_thousands_in_one_millisecond(frozen_clock: SimpleNamespace) -> None:
    start_ms = frozen_clock.ns // 1_000_000
    values = [ids.uuid7() for _ in range(10_000)]
    assert all(a < b for a, b in itertools.pairwise(values))
    assert all(value.version == 7 and value.variant == uuid.RFC_4122 for value in values)
    # The 12-bit counter holds at least 3072 per millisecond; beyond that the next millisecond is borrowed.
    times_ms = [value.int >> 80 for value in values]
    assert times_ms[0] == start_ms
    assert times_ms[3071] == start_ms
    assert start_ms < times_ms[-1] <= start_ms + 4


def test_monotonic_when_the_clock_steps_back(frozen_clock: SimpleNamespace) -> None:
    first = ids.uuid7()
    frozen_clock.ns -= 5_000_000_000  # NTP step five seconds back
    second = ids.uuid7()
    frozen_clock.ns += 10_000_000_000
    third = ids.uuid7()
    assert first < second < third
    assert ids.uuid7_time(third) == pytest.approx(frozen_clock.ns / 1e9, abs=0.001)


def test_new_millisecond_restarts_counter_low(frozen_clock: SimpleNamespace) -> None:
    ids.uuid7()
    frozen_clock.ns += 1_000_000
    value = ids.uuid7()
    # rand_a starts below 0x400 each new millisecond, leaving room for >= 3072 more in that millisecond.
    assert (value.int >> 64) & 0xFFF <= 0x3FF
