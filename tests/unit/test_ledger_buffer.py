"""The usage buffer in the embedded mode: records go to the spool, unless metering is switched off."""

from __future__ import annotations

from pathlib import Path

from gateway.limits.store import LocalStore
from gateway.metering.buffer import LedgerBuffer
from gateway.metering.spool import Spool

ROW = {"request_id": "0193f0c1-0000-7000-8000-000000000001", "status": 200, "prompt_tokens": 3}


def buffer(tmp_path: Path, *, enabled: bool) -> LedgerBuffer:
    spool = Spool(tmp_path / "spool", fsync=False)
    return LedgerBuffer(
        spool, LocalStore(), redis=None, timeout=1.0, max_backlog=10, max_spool_bytes=1 << 20, enabled=enabled
    )


async def test_a_record_is_in_the_spool_once_record_returns(tmp_path: Path) -> None:
    ledger = buffer(tmp_path, enabled=True)
    try:
        await ledger.record(ROW, [])
        assert ledger.spool.pending_bytes() > 0
    finally:
        ledger.spool.close()


async def test_with_metering_off_nothing_is_buffered(tmp_path: Path) -> None:
    ledger = buffer(tmp_path, enabled=False)
    try:
        await ledger.record(ROW, [])
        assert ledger.spool.pending_bytes() == 0
    finally:
        ledger.spool.close()
