"""Shared fixtures. The end-to-end suite runs once per database: SQLite and PostgreSQL (a database it creates)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.harness import (
    Database,
    Gateway,
    MockBackend,
    Tenant,
    create_database,
    gateway_config,
    make_tenant,
    start_gateway,
    start_mock_backend,
    wait_for,
)


@pytest.fixture(scope="session")
def session_tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("suite")


@pytest.fixture(scope="session")
def mock_backend(session_tmp: Path) -> Iterator[MockBackend]:
    backend = start_mock_backend(session_tmp)
    yield backend
    backend.close()


@pytest.fixture
def backend(mock_backend: MockBackend) -> MockBackend:
    """The shared mock backend, with its faults, counters and request log cleared."""
    mock_backend.reset()
    return mock_backend


@pytest.fixture(scope="session", params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest, session_tmp: Path) -> Iterator[Database]:
    db = create_database(request.param, session_tmp)
    yield db
    db.drop()


@pytest.fixture
def postgres(tmp_path: Path) -> Iterator[Database]:
    """A PostgreSQL database of this test's own (for tests that need PostgreSQL only, e.g. outages by proxy)."""
    database = create_database("postgresql", tmp_path)
    yield database
    database.drop()


@pytest.fixture(scope="session")
def gateway(database: Database, mock_backend: MockBackend, session_tmp: Path) -> Iterator[Gateway]:
    gw = start_gateway(session_tmp, gateway_config(database.url, mock_backend.url))
    yield gw
    code = gw.stop()
    assert code == 0, gw.log()[-3000:]
    assert "Traceback" not in gw.log(), gw.log()[-5000:]


def wait_key_known(gateway: Gateway, key: str) -> None:
    """A key made after the gateway started becomes usable within one snapshot poll."""

    def known() -> bool:
        response = httpx.get(f"{gateway.base_url}/models", headers={"Authorization": f"Bearer {key}"})
        return response.status_code == 200

    wait_for(known, timeout=5, what="the gateway to load the new key")


@pytest.fixture
def tenant(gateway: Gateway, database: Database) -> Tenant:
    created = make_tenant(database.engine)
    wait_key_known(gateway, created.key)
    return created
