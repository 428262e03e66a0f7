"""Structured JSON logs on stderr. Fields passed with `extra=` become keys; secrets are never passed."""

from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
import time
from typing import Any, TextIO

import orjson

_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for name, value in record.__dict__.items():
            if name not in _STANDARD:
                entry[name] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


class BufferedHandler(logging.Handler):
    """Writes log lines in batches: a system call per access-log line costs the event loop more than the line.

    Lines at WARNING and above are written at once (with whatever is buffered before them); the rest within
    `interval` seconds, or as soon as 64 KiB are waiting. A background thread does the timed flushes.
    """

    def __init__(self, stream: TextIO, *, interval: float = 0.2, limit: int = 65536) -> None:
        super().__init__()
        self._stream = stream
        self._interval = interval
        self._limit = limit
        self._lines: list[str] = []
        self._size = 0
        self._pending = threading.Event()
        threading.Thread(target=self._flush_periodically, name="log-flusher", daemon=True).start()
        atexit.register(self.flush)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:
            self.handleError(record)
            return
        with self.lock:  # type: ignore[union-attr]
            self._lines.append(line)
            self._size += len(line) + 1
            urgent = record.levelno >= logging.WARNING or self._size >= self._limit
        if urgent:
            self.flush()
        else:
            self._pending.set()

    def append(self, line: str) -> None:
        """A line formatted elsewhere (the access log): no LogRecord, no formatter on the request path."""
        with self.lock:  # type: ignore[union-attr]
            self._lines.append(line)
            self._size += len(line) + 1
            urgent = self._size >= self._limit
        if urgent:
            self.flush()
        else:
            self._pending.set()

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            lines, self._lines, self._size = self._lines, [], 0
        if lines:
            try:
                self._stream.write("\n".join(lines) + "\n")
                self._stream.flush()
            except (OSError, ValueError):  # stderr closed: nowhere left to write
                pass

    def _flush_periodically(self) -> None:
        while True:
            self._pending.wait()
            time.sleep(self._interval)
            self._pending.clear()
            self.flush()


_fast: BufferedHandler | None = None
_second = -1
_second_text = ""


def _timestamp(now: float) -> str:
    global _second, _second_text
    whole = int(now)
    if whole != _second:  # formatted once a second
        _second, _second_text = whole, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))
    return f"{_second_text}.{int((now - whole) * 1000):03d}Z"


def write_info(logger: logging.Logger, message: str, fields: dict[str, Any]) -> None:
    """An INFO line with `fields`, the same JSON as `logger.info(message, extra=fields)` gives, written straight
    into the buffered handler when logging is set up with one (the gateway's processes), else through logging."""
    if not logger.isEnabledFor(logging.INFO):
        return
    if _fast is None:
        logger.info(message, extra=fields)
        return
    entry = {"ts": _timestamp(time.time()), "level": "info", "logger": logger.name, "msg": message, **fields}
    _fast.append(orjson.dumps(entry, default=str).decode())


def configure_logging() -> None:
    global _fast
    level = os.environ.get("GATEWAY_LOG_LEVEL", "INFO").upper()
    handler = _fast = BufferedHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
