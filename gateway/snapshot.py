"""One versioned cache for everything the hot path reads from SQL: API keys, prices and limit overrides.

Every change to those tables bumps `cache_state.version` in the same transaction. Each process polls the
version (every `auth.cache_poll_interval`, 0.25 s by default) and reloads the whole snapshot when it moves, so a
revocation reaches every process within about one poll interval plus one reload. A pub/sub message may speed
that up, but the poll is the guarantee. While the database is down the last snapshot keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import sqlalchemy as sa

from gateway.auth.store import KeyRecord, load_keys
from gateway.db.engine import SqlRunner, utcnow
from gateway.db.schema import cache_state, deployment_drains
from gateway.limits.policy import Override, OverrideKey, load_overrides
from gateway.metering.prices import PriceBook, load_prices

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Snapshot:
    version: int
    keys: Mapping[str, KeyRecord]
    prices: PriceBook
    overrides: Mapping[OverrideKey, Override]
    drains: frozenset[tuple[str, str]]  # (deployment, endpoint URL or '' for the whole deployment)
    loaded_at: float


def read_version(connection: sa.Connection) -> int:
    version = connection.execute(sa.select(cache_state.c.version).where(cache_state.c.id == 1)).scalar()
    return int(version or 0)


def bump_version(connection: sa.Connection) -> None:
    """Call inside the transaction that changed keys, teams, users or prices."""
    connection.execute(
        cache_state.update().where(cache_state.c.id == 1).values(version=cache_state.c.version + 1, updated_at=utcnow())
    )


def load_snapshot(engine: sa.Engine) -> Snapshot:
    with engine.connect() as connection:
        # Version first: a change committed while we load makes the next poll see a newer version and reload.
        version = read_version(connection)
        return Snapshot(
            version=version,
            keys=load_keys(connection),
            prices=load_prices(connection),
            overrides=load_overrides(connection),
            drains=frozenset(
                (row.deployment, row.endpoint)
                for row in connection.execute(sa.select(deployment_drains.c.deployment, deployment_drains.c.endpoint))
            ),
            loaded_at=time.time(),
        )


_POLL_TIMEOUT = 5.0  # as long as connecting may take (connect_timeout)
_VERSION_SQL = "SELECT version FROM cache_state WHERE id = 1"


class _VersionReader:
    """The version poll, on one connection kept open in autocommit. Every process polls several times a second:
    a pooled checkout would add its pre-ping and the transaction's rollback (three round trips instead of one), and
    the statement's trip through SQLAlchemy costs ~3x the CPU of the plain query, time the event loop shares the
    GIL with."""

    def __init__(self, engine: sa.Engine) -> None:
        self._engine = engine
        self._connection: sa.Connection | None = None

    def read(self) -> int:
        connection = self._connection
        if connection is None:
            connection = self._connection = self._engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        try:
            return int(connection.exec_driver_sql(_VERSION_SQL).scalar() or 0)
        except sa.exc.SQLAlchemyError:
            self.close()  # a broken connection: the next poll opens a new one
            raise

    def close(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            with contextlib.suppress(sa.exc.SQLAlchemyError):
                connection.close()


class SnapshotCache:
    def __init__(self, sql: SqlRunner, *, poll_interval: float) -> None:
        self._sql = sql
        self._poll_interval = poll_interval
        self._versions = _VersionReader(sql.engine)
        self._current: Snapshot | None = None
        self._wakeup = asyncio.Event()
        self.database_healthy = False
        self.on_reload: list[Callable[[Snapshot], None]] = []

    @property
    def ready(self) -> bool:
        return self._current is not None

    @property
    def current(self) -> Snapshot:
        snapshot = self._current
        if snapshot is None:
            raise RuntimeError("snapshot not loaded yet")
        return snapshot

    async def load(self) -> Snapshot:
        snapshot = await self._sql.run(load_snapshot, self._sql.engine)
        self._current = snapshot
        self.database_healthy = True
        for callback in self.on_reload:
            callback(snapshot)
        return snapshot

    async def load_when_reachable(self, max_delay: float = 5.0) -> None:
        """At start-up: wait for the database instead of failing. A worker restarted during an outage would otherwise
        exit and be restarted in a loop (a start costs a core for a second or two); it takes no connection until
        this returns, and SIGTERM still ends it at once."""
        delay, waited = self._poll_interval, False
        while True:
            try:
                await self.load()
                break
            except sa.exc.SQLAlchemyError as exc:
                if not waited:
                    log.warning(
                        "database unreachable (%s): waiting for the database before serving", type(exc).__name__
                    )
                waited = True
            await asyncio.sleep(delay)
            delay = min(delay * 2, max_delay)
        if waited:
            log.info("database reachable: serving")

    async def close(self) -> None:
        await self._sql.run(self._versions.close)

    def hint(self) -> None:
        """Something changed (e.g. a pub/sub message): poll now rather than at the next tick."""
        self._wakeup.set()

    async def poll_forever(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._poll_interval):
                    await self._wakeup.wait()
            self._wakeup.clear()
            await self.poll_once()

    async def poll_once(self) -> None:
        try:
            # Bounded: a database that stops answering (a hung server, a partition) raises no error of its own.
            async with asyncio.timeout(_POLL_TIMEOUT):
                if self._current is None:
                    await self.load()
                    return
                version = await self._sql.run(self._versions.read)
                if version != self._current.version:
                    snapshot = await self.load()
                    log.info("cache reloaded", extra={"version": snapshot.version, "keys": len(snapshot.keys)})
            self.database_healthy = True
        except (sa.exc.SQLAlchemyError, TimeoutError) as exc:
            if self.database_healthy:
                log.warning("database unreachable; serving from the last snapshot: %s", type(exc).__name__)
            self.database_healthy = False
