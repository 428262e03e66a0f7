"""Engine creation. SQL runs synchronously on a small dedicated thread pool: never on the event loop."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import os
import socket
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import make_url

P = ParamSpec("P")
T = TypeVar("T")


def normalise_url(url: str) -> str:
    """`postgresql://` means psycopg 3 here (SQLAlchemy's default would be psycopg2, which we don't ship)."""
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed.render_as_string(hide_password=False)


_SQLITE_BUSY_MS = 20_000


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # WAL lets the CLI write while gateway processes read; busy_timeout rides out the writer lock (SQL never runs
    # on the request path, so a long wait only slows an admin call or the ledger writer, never a request).
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute(f"PRAGMA busy_timeout={_SQLITE_BUSY_MS}")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


# A database that drops off the network (no reset, no answer) would hold SQL blocked on it for as long as TCP
# retransmits (~15 min), or an idle connection's first keepalive (2 h): both are bounded to about a minute, after
# which the call fails like any outage (the ledger writer keeps the records buffered and retries).
_POSTGRES_CONNECT_ARGS = {
    "connect_timeout": 5,
    "keepalives": 1,
    "keepalives_idle": 30,
    "keepalives_interval": 10,
    "keepalives_count": 3,
    "tcp_user_timeout": 60_000,  # ms that sent data may stay unacknowledged
}


def create_engine(url: str, *, pool_size: int = 5) -> sa.Engine:
    url = normalise_url(url)
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(url, connect_args={"timeout": _SQLITE_BUSY_MS / 1000})
        sa.event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return sa.create_engine(
        url,
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_pre_ping=True,
        pool_timeout=5,
        connect_args=_POSTGRES_CONNECT_ARGS,
    )


def utcnow() -> datetime:
    return datetime.now(UTC)


def as_utc(value: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes; everything we store is UTC."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)


class SqlRunner:
    """Runs blocking SQL functions on a dedicated pool, so a slow database never stalls the event loop."""

    def __init__(self, engine: sa.Engine, *, threads: int = 2) -> None:
        self.engine = engine
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="sql")
        self._running: set[concurrent.futures.Future[Any]] = set()
        self._closed = False
        # Every PostgreSQL connection the pool made (SQL can hang on one before it is checked out: the pre-ping).
        self._connections: weakref.WeakSet[Any] = weakref.WeakSet()
        sa.event.listen(engine, "connect", self._remember)
        sa.event.listen(engine, "do_connect", self._refuse_once_closed)

    async def run(self, func: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        future = self._executor.submit(functools.partial(func, *args, **kwargs))
        self._running.add(future)
        future.add_done_callback(self._running.discard)
        return await asyncio.wrap_future(future)

    def close(self, grace: float = 1.0) -> None:
        """Stop the pool. SQL still running after `grace` waits on a database that stopped answering (a hung server,
        a partition: nothing times that out), and would keep the process from exiting: its sockets are shut down, so
        it fails at once (a transaction not committed is rolled back; the ledger's records stay buffered)."""
        self._executor.shutdown(wait=False, cancel_futures=True)
        concurrent.futures.wait(list(self._running), timeout=grace)
        self._closed = True
        if self._running:
            for dbapi_connection in list(self._connections):
                _shut_down_socket(dbapi_connection)
        self._executor.shutdown(wait=True)
        self.engine.dispose()

    def _remember(self, dbapi_connection: Any, _record: Any) -> None:
        if hasattr(dbapi_connection, "pgconn"):  # psycopg; SQLite has no socket to hang on
            self._connections.add(dbapi_connection)

    def _refuse_once_closed(self, *_: Any) -> None:
        # A failed pre-ping reconnects: on a database that stopped answering, that would hang up to connect_timeout.
        if self._closed:
            raise ConnectionAbortedError("SQL runner closed")


def _shut_down_socket(dbapi_connection: Any) -> None:
    pgconn: Any = dbapi_connection.pgconn
    # A copy of the descriptor: the connection still owns its own. Already closed: nothing to wake.
    with contextlib.suppress(Exception), socket.socket(fileno=os.dup(pgconn.socket)) as sock:
        sock.shutdown(socket.SHUT_RDWR)
