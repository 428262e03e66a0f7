"""The local spool: durable appends (group commit on a thread), rotation, crash recovery, one process per slot."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from gateway.metering.spool import Spool, adopt, claim_directory, closed_segments, release, slot_directories


async def test_appends_are_on_disk_when_they_return(tmp_path: Path) -> None:
    spool = Spool(tmp_path, fsync=True)
    await asyncio.gather(*(spool.append(f'{{"n": {index}}}'.encode()) for index in range(200)))
    # Before any rotation, the active segment already holds every record: a crash now loses nothing.
    active = list(spool.directory.glob("*.active"))
    assert len(active) == 1
    assert active[0].read_bytes().count(b"\n") == 200
    spool.rotate(force=True)
    segments = spool.closed_segments()
    assert [record for segment in segments for record in Spool.read(segment)] == [
        f'{{"n": {index}}}'.encode() for index in range(200)
    ]
    for segment in segments:
        Spool.delete(segment)
    assert spool.pending_bytes() == 0
    spool.close()


async def test_rotation_waits_for_the_interval_unless_forced(tmp_path: Path) -> None:
    spool = Spool(tmp_path, rotate_seconds=3600)
    await spool.append(b"{}")
    spool.rotate()
    assert spool.closed_segments() == []
    spool.rotate(force=True)
    assert len(spool.closed_segments()) == 1
    spool.close()


def test_torn_last_record_is_skipped(tmp_path: Path) -> None:
    segment = tmp_path / "00000000000000000001.jsonl"
    segment.write_bytes(b'{"a": 1}\n{"b": 2}\n{"c": 3')
    assert list(Spool.read(segment)) == [b'{"a": 1}', b'{"b": 2}']


async def test_each_process_gets_its_own_slot_and_orphans_are_adopted(tmp_path: Path) -> None:
    first = Spool(tmp_path)
    second_dir, second_lock = claim_directory(tmp_path)
    assert second_dir != first.directory  # the first slot is held
    await first.append(b'{"x": 1}')
    assert adopt(first.directory) is None  # a live process's active segment is never taken

    # The first process "dies" without closing: its lock goes, its active segment stays.
    os.close(first._lock_handle)
    lock = adopt(first.directory)
    assert lock is not None
    segments = closed_segments(first.directory)
    assert [record for segment in segments for record in Spool.read(segment)] == [b'{"x": 1}']
    assert [path.parent for path in slot_directories(tmp_path)] == [tmp_path, tmp_path]
    release(lock)
    release(second_lock)
    first._queue.put(None)  # stop its thread; its lock is already gone
