"""UTC time helpers shared by the ledger and the limiter."""

from __future__ import annotations

from datetime import UTC, datetime


def from_ms(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)
