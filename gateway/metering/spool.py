"""The local spool: an append-only file of usage records, the durable buffer when there is no Redis (or Redis
refuses a record).

Appends happen on one dedicated thread, never on the event loop. Records that arrive together are written and
fsynced together (group commit), and each caller's future resolves only after its record is on disk: a request's
usage is durable before its client gets the last byte. The active segment is rotated every few seconds; the
ledger writer inserts closed segments into SQL and deletes them after the commit. A torn last line (a crash mid
write) belongs to a request that never completed, and is skipped.

Each serving process spools into a directory of its own (`<spool_dir>/slot-N`, held with an exclusive lock). The
ledger writer process reads the closed segments of every slot, and adopts the active segment of a process that
died (its lock is free).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import logging
import os
import queue
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path

from sqlalchemy.engine import make_url

log = logging.getLogger(__name__)

_SUFFIX = ".jsonl"
_ACTIVE = ".active"


def _try_lock(directory: Path) -> int | None:
    """An exclusive lock on a spool directory, or None if another live process holds it."""
    directory.mkdir(parents=True, exist_ok=True)
    handle = os.open(directory / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(handle)
        return None
    return handle


def claim_directory(base: Path) -> tuple[Path, int]:
    """The first `slot-N` directory under `base` that no live process holds: each process spools alone."""
    for index in range(1024):
        directory = base / f"slot-{index}"
        lock = _try_lock(directory)
        if lock is not None:
            return directory, lock
    raise RuntimeError(f"no free spool directory under {base}")


def spool_base(spool_dir: str, database_url: str) -> Path:
    """The spool directory for one ledger database. Gateways started from the same directory against different
    databases (a test, a staging copy) must never replay each other's records into the wrong ledger."""
    parsed = make_url(database_url)
    identity = parsed.set(password=None).render_as_string(hide_password=False)
    return Path(spool_dir) / f"db-{hashlib.sha256(identity.encode()).hexdigest()[:12]}"


def slot_directories(base: Path) -> list[Path]:
    return sorted(base.glob("slot-*")) if base.exists() else []


def closed_segments(directory: Path) -> list[Path]:
    """Segments no process appends to any more: safe to read and delete (oldest first)."""
    return sorted(directory.glob(f"*{_SUFFIX}"))


def adopt(directory: Path) -> int | None:
    """If the process that spooled into `directory` is gone (its lock is free), take the lock and close its active
    segment, so everything in it can be written. Returns the lock to release, or None if the owner is alive."""
    if not any(directory.glob(f"*{_SUFFIX}{_ACTIVE}")):
        return None
    lock = _try_lock(directory)
    if lock is not None:
        _recover(directory)
    return lock


def release(lock: int) -> None:
    os.close(lock)  # closing the descriptor drops the flock


def _recover(directory: Path) -> None:
    """An active segment left by a crashed process is closed as it is: everything in it was acknowledged."""
    for path in directory.glob(f"*{_SUFFIX}{_ACTIVE}"):
        path.rename(path.with_name(path.name.removesuffix(_ACTIVE)))


class Spool:
    def __init__(self, base: Path, *, fsync: bool = True, rotate_seconds: float = 2.0) -> None:
        self.base = base
        self.directory, self._lock_handle = claim_directory(base)
        self.fsync = fsync
        self.rotate_seconds = rotate_seconds
        _recover(self.directory)
        self._queue: queue.SimpleQueue[tuple[bytes, Future[None]] | None] = queue.SimpleQueue()
        self._handle: int | None = None
        self._active_path: Path | None = None
        self._opened_at = 0.0
        self._lock = threading.Lock()  # guards rotation against the writer thread
        self._thread = threading.Thread(target=self._run, name="usage-spool", daemon=True)
        self._thread.start()

    # --- appending (any thread) ---

    async def append(self, record: bytes) -> None:
        """Resolves once the record is written (and fsynced, if configured)."""
        future: Future[None] = Future()
        self._queue.put((record, future))
        await asyncio.wrap_future(future)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            batch = [item]
            with contextlib.suppress(queue.Empty):
                while len(batch) < 1024:
                    next_item = self._queue.get_nowait()
                    if next_item is None:
                        self._write(batch)
                        return
                    batch.append(next_item)
            self._write(batch)

    def _write(self, batch: list[tuple[bytes, Future[None]]]) -> None:
        try:
            with self._lock:
                handle = self._active()
                os.write(handle, b"".join(record + b"\n" for record, _ in batch))
                if self.fsync:
                    os.fsync(handle)
        except OSError as exc:
            for _, future in batch:
                future.set_exception(exc)
            return
        for _, future in batch:
            future.set_result(None)

    def _active(self) -> int:
        if self._handle is None:
            name = f"{time.time_ns():020d}{_SUFFIX}{_ACTIVE}"
            self._active_path = self.directory / name
            self._handle = os.open(self._active_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            self._opened_at = time.monotonic()
        return self._handle

    # --- reading (the ledger writer) ---

    def rotate(self, *, force: bool = False) -> None:
        """Close the active segment if it is old enough (or `force`), making it available to the writer."""
        with self._lock:
            if self._handle is None or (not force and time.monotonic() - self._opened_at < self.rotate_seconds):
                return
            os.close(self._handle)
            self._handle = None
            assert self._active_path is not None
            self._active_path.rename(self._active_path.with_name(self._active_path.name.removesuffix(_ACTIVE)))

    def closed_segments(self) -> list[Path]:
        return closed_segments(self.directory)

    async def rotate_forever(self) -> None:
        """Close the active segment every `rotate_seconds`, so the ledger writer (another process) can take it."""
        while True:
            await asyncio.sleep(self.rotate_seconds)
            await asyncio.to_thread(self.rotate)

    @staticmethod
    def read(segment: Path) -> Iterator[bytes]:
        with open(segment, "rb") as handle:
            for line in handle:
                if line.endswith(b"\n"):
                    yield line[:-1]
                else:
                    log.warning("spool %s ends with a torn record (crash mid-write); skipped", segment.name)

    @staticmethod
    def delete(segment: Path) -> None:
        segment.unlink(missing_ok=True)

    def pending_bytes(self) -> int:
        return sum(path.stat().st_size for path in self.directory.glob(f"*{_SUFFIX}*"))

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=10)
        self.rotate(force=True)
        release(self._lock_handle)
