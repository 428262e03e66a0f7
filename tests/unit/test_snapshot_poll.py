"""The key cache's version poll (gateway/snapshot.py): one connection kept open in autocommit, so every poll sees
the latest committed version, a broken connection is replaced at the next poll, and polling opens no connections.

Real SQLite and PostgreSQL databases; the PostgreSQL outage is a real cut through tests/tcp_proxy.py."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from gateway.db.engine import SqlRunner, create_engine
from gateway.snapshot import SnapshotCache, bump_version
from tests.harness import Database, create_database
from tests.tcp_proxy import TcpProxy, via_proxy


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    db = create_database(request.param, tmp_path)
    yield db
    db.drop()


def bump(engine: sa.Engine) -> None:
    with engine.begin() as connection:
        bump_version(connection)


def connections_to(engine: sa.Engine, state: str | None = None) -> int:
    query = "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
    with engine.connect() as connection:
        if state is None:
            return int(connection.exec_driver_sql(query).scalar() or 0)
        return int(connection.exec_driver_sql(query + " AND state = %(state)s", {"state": state}).scalar() or 0)


async def test_each_poll_sees_the_latest_committed_version(database: Database) -> None:
    sql = SqlRunner(create_engine(database.url))
    cache = SnapshotCache(sql, poll_interval=0.25)
    try:
        first = (await cache.load()).version
        for expected in range(first + 1, first + 4):
            bump(database.engine)  # committed by another connection, between two polls
            await cache.poll_once()
            assert cache.current.version == expected
    finally:
        await cache.close()
        sql.close()


async def test_a_poll_after_an_outage_reconnects_and_polls_open_no_connections(tmp_path: Path) -> None:
    database = create_database("postgresql", tmp_path)
    proxy = TcpProxy("127.0.0.1", 5432)
    sql = SqlRunner(create_engine(via_proxy(database.url, proxy)))
    cache = SnapshotCache(sql, poll_interval=0.25)
    try:
        version = (await cache.load()).version
        await cache.poll_once()
        connected = connections_to(database.engine)
        for _ in range(20):
            await cache.poll_once()
        assert connections_to(database.engine) == connected  # the same connection, poll after poll
        # Between polls it holds no transaction open (which would hold back vacuum and block partition upkeep).
        assert connections_to(database.engine, "idle in transaction") == 0

        proxy.cut()
        await cache.poll_once()
        assert not cache.database_healthy
        assert cache.current.version == version  # the last snapshot keeps serving

        proxy.restore()
        bump(database.engine)
        await cache.poll_once()
        assert cache.database_healthy
        assert cache.current.version == version + 1
    finally:
        await cache.close()
        sql.close()
        proxy.close()
        database.drop()
