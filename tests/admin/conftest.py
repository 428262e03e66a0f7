"""Fixtures of the admin tests: a gateway with a configured organisation admin key, on each database, and clients
for the two roles."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from gateway import accounts
from gateway.db.schema import api_keys
from gateway.snapshot import bump_version
from tests.harness import PEPPER, Database, Gateway, MockBackend, gateway_config, start_gateway

ADMIN_KEY = "test-admin-key-" + "0123456789abcdef"


@dataclass
class TeamAdmin:
    team: str
    user: str
    key: str  # a team admin API key: may call /v1 and manage its team
    member_key: str  # an ordinary key of the same team
    member_prefix: str


def client(gateway: Gateway, key: str) -> httpx.Client:
    return httpx.Client(base_url=gateway.url, headers={"Authorization": f"Bearer {key}"}, timeout=30)


def make_team_admin(database: Database) -> TeamAdmin:
    """A team with a user, a team admin key and an ordinary key."""
    engine = database.engine
    suffix = secrets.token_hex(4)
    team, user = f"team-{suffix}", f"user-{suffix}"
    accounts.create_team(engine, team)
    accounts.create_user(engine, user)
    admin = accounts.create_key(engine, PEPPER.encode(), team=team, user=user, name="lead")
    member = accounts.create_key(engine, PEPPER.encode(), team=team, user=user, name="member", tags=["research"])
    with engine.begin() as connection:
        connection.execute(api_keys.update().where(api_keys.c.id == admin.key_id).values(team_admin=True))
        bump_version(connection)
    return TeamAdmin(team, user, admin.secret, member.secret, member.display_prefix)


@pytest.fixture(scope="session")
def admin_gateway(database: Database, mock_backend: MockBackend, session_tmp: Path) -> Iterator[Gateway]:
    config = gateway_config(database.url, mock_backend.url, **{"admin.keys": [ADMIN_KEY]})
    gateway = start_gateway(session_tmp, config)
    yield gateway
    assert gateway.stop() == 0, gateway.log()[-3000:]
    assert "Traceback" not in gateway.log(), gateway.log()[-5000:]


@pytest.fixture
def org(admin_gateway: Gateway) -> Iterator[httpx.Client]:
    with client(admin_gateway, ADMIN_KEY) as http:
        yield http


@pytest.fixture
def lead(database: Database) -> TeamAdmin:
    return make_team_admin(database)


@pytest.fixture
def other(database: Database) -> TeamAdmin:
    return make_team_admin(database)
