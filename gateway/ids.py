"""Gateway-made request ids: UUIDv7 (RFC 9562), so ledger keys sort by time and index well."""

from __future__ import annotations

import os
import random
import time
import uuid

_last_ms = 0
_sequence = 0
# Request ids need uniqueness, not secrecy: a seeded PRNG, not a getrandom() system call per id.
_random = random.Random(os.urandom(32))


def uuid7() -> uuid.UUID:
    """A UUIDv7 whose 12-bit `rand_a` field is a per-millisecond counter, so ids from one process are monotonic."""
    global _last_ms, _sequence
    now_ms = time.time_ns() // 1_000_000
    if now_ms > _last_ms:
        _last_ms = now_ms
        _sequence = _random.getrandbits(10)  # leave room to count up
    else:
        _sequence += 1
        if _sequence > 0xFFF:  # counter exhausted within one ms: borrow the next millisecond
            _last_ms += 1
            _sequence = 0
        now_ms = _last_ms
    rand_b = _random.getrandbits(62)
    value = (now_ms << 80) | (0x7 << 76) | (_sequence << 64) | (0b10 << 62) | rand_b
    return uuid.UUID(int=value)


def uuid7_time(value: uuid.UUID) -> float:
    """The Unix time (seconds) a UUIDv7 was made."""
    return (value.int >> 80) / 1000.0
