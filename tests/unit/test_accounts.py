"""gateway.accounts on a real SQLite database: teams, users, keys, their states, and the cache version bumps."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from gateway import accounts
from gateway.accounts import AccountError, parse_duration
from gateway.auth import keys
from gateway.auth.store import KeyRecord, authenticate, load_keys
from gateway.db.engine import create_engine
from gateway.db.migrate import upgrade
from gateway.errors import AuthenticationFailed
from gateway.snapshot import read_version

PEPPER = b"pepper-for-unit-tests-0123456789"


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[sa.Engine]:
    engine = create_engine(f"sqlite:///{tmp_path / 'gateway.db'}")
    upgrade(engine)
    yield engine
    engine.dispose()


def _version(engine: sa.Engine) -> int:
    with engine.connect() as connection:
        return read_version(connection)


def _keys(engine: sa.Engine) -> dict[str, KeyRecord]:
    with engine.connect() as connection:
        return load_keys(connection)


def _state(engine: sa.Engine, prefix: str) -> str:
    (row,) = [row for row in accounts.list_keys(engine) if row["prefix"] == prefix]
    return str(row["state"])


# --- durations -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("45s", timedelta(seconds=45)),
        ("90m", timedelta(minutes=90)),
        (" 12h ", timedelta(hours=12)),
        ("30 d", timedelta(days=30)),
        ("2w", timedelta(weeks=2)),
        ("0s", timedelta(0)),
    ],
)
def test_parse_duration(text: str, expected: timedelta) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text", ["", "10", "h", "1.5h", "-1d", "10y", "1d2h", "12H", "twelve hours"])
def test_parse_duration_refuses(text: str) -> None:
    with pytest.raises(AccountError, match="cannot read duration"):
        parse_duration(text)


# --- teams and users -------------------------------------------------------------------------------------


def test_create_team_bumps_version_and_duplicates_fail_cleanly(engine: sa.Engine) -> None:
    start = _version(engine)
    team_id = accounts.create_team(engine, "research")
    assert _version(engine) == start + 1
    with pytest.raises(AccountError, match="team 'research' already exists"):
        accounts.create_team(engine, "research")
    assert _version(engine) == start + 1  # the failed change bumped nothing
    assert accounts.ensure_team(engine, "research") == team_id
    assert _version(engine) == start + 1  # nothing changed
    assert [team["name"] for team in accounts.list_teams(engine)] == ["research"]


def test_users(engine: sa.Engine) -> None:
    start = _version(engine)
    user_id = accounts.create_user(engine, "alice", "alice@example.com")
    with pytest.raises(AccountError, match="user 'alice' already exists"):
        accounts.create_user(engine, "alice")
    assert accounts.ensure_user(engine, "alice") == user_id
    assert accounts.ensure_user(engine, "bob") != user_id
    assert _version(engine) == start + 2
    assert [(u["name"], u["email"]) for u in accounts.list_users(engine)] == [
        ("alice", "alice@example.com"),
        ("bob", None),
    ]


def test_unknown_team_or_user(engine: sa.Engine) -> None:
    with pytest.raises(AccountError, match="team 'nope' does not exist"):
        accounts.create_key(engine, PEPPER, team="nope")
    accounts.create_team(engine, "t")
    with pytest.raises(AccountError, match="user 'ghost' does not exist"):
        accounts.create_key(engine, PEPPER, team="t", user="ghost")
    with pytest.raises(AccountError, match="team 'nope' does not exist"):
        accounts.set_team_disabled(engine, "nope", True)
    with pytest.raises(AccountError, match="user 'ghost' does not exist"):
        accounts.set_user_disabled(engine, "ghost", True)


# --- keys ------------------------------------------------------------------------------------------------


def test_create_key_stores_only_the_hmac(engine: sa.Engine) -> None:
    accounts.create_team(engine, "t")
    accounts.create_user(engine, "alice")
    start = _version(engine)
    created = accounts.create_key(
        engine, PEPPER, team="t", user="alice", models=["b", "a", "b"], name="ci", tags=["x", "x", "y"]
    )
    assert _version(engine) == start + 1
    assert keys.parse_key_id(created.secret) == created.key_id
    assert created.display_prefix == "sk-gw-" + created.key_id
    assert created.expires_at is None

    record = _keys(engine)[created.key_id]
    assert record.secret_hmac == keys.hash_key(PEPPER, created.secret)
    assert (record.team_name, record.user_name, record.name) == ("t", "alice", "ci")
    assert record.allowed_models == frozenset({"a", "b"})
    assert record.tags == ("x", "y")
    assert record.inactive_reason is None
    with engine.connect() as connection:
        stored = connection.execute(sa.text("SELECT * FROM api_keys")).mappings().one()
    assert created.secret not in repr(dict(stored))

    assert authenticate(_keys(engine), PEPPER, created.secret).key_id == created.key_id


@pytest.mark.parametrize("form", ["prefix", "whole key", "bare id", "padded prefix"])
def test_revoke_by_reference(engine: sa.Engine, form: str) -> None:
    accounts.create_team(engine, "t")
    created = accounts.create_key(engine, PEPPER, team="t")
    reference = {
        "prefix": created.display_prefix,
        "whole key": created.secret,
        "bare id": created.key_id,
        "padded prefix": f"  {created.display_prefix}\n",
    }[form]
    start = _version(engine)
    assert accounts.revoke_key(engine, reference) == created.display_prefix
    assert _version(engine) == start + 1
    assert _state(engine, created.display_prefix) == "revoked"
    with pytest.raises(AuthenticationFailed, match=r"not active \(revoked\)"):
        authenticate(_keys(engine), PEPPER, created.secret)
    with pytest.raises(AccountError, match="is already revoked"):
        accounts.revoke_key(engine, reference)
    assert _version(engine) == start + 1


def test_revoke_unknown(engine: sa.Engine) -> None:
    start = _version(engine)
    with pytest.raises(AccountError, match="does not exist"):
        accounts.revoke_key(engine, "sk-gw-AAAAAAAAAAAA")
    assert _version(engine) == start


def test_list_states_and_team_filter(engine: sa.Engine) -> None:
    accounts.create_team(engine, "t")
    accounts.create_team(engine, "off")
    accounts.create_user(engine, "alice")
    active = accounts.create_key(engine, PEPPER, team="t", expires_in=parse_duration("30d"))
    revoked = accounts.create_key(engine, PEPPER, team="t")
    expired = accounts.create_key(engine, PEPPER, team="t", expires_in=timedelta(seconds=-1))
    user_off = accounts.create_key(engine, PEPPER, team="t", user="alice")
    team_off = accounts.create_key(engine, PEPPER, team="off")
    accounts.revoke_key(engine, revoked.display_prefix)

    version = _version(engine)
    accounts.set_team_disabled(engine, "off", True)
    accounts.set_user_disabled(engine, "alice", True)
    assert _version(engine) == version + 2

    states = {row["prefix"]: row["state"] for row in accounts.list_keys(engine)}
    assert states == {
        active.display_prefix: "active",
        revoked.display_prefix: "revoked",
        expired.display_prefix: "expired",
        user_off.display_prefix: "user disabled",
        team_off.display_prefix: "team disabled",
    }
    assert [row["prefix"] for row in accounts.list_keys(engine, team="off")] == [team_off.display_prefix]
    listed = {row["prefix"]: row for row in accounts.list_keys(engine)}
    assert listed[active.display_prefix]["expires_at"] == active.expires_at  # tz-aware UTC on the way back
    assert listed[active.display_prefix]["expires_at"].tzinfo is not None

    counts = {team["name"]: team["active_keys"] for team in accounts.list_teams(engine)}
    assert counts == {"off": 1, "t": 3}  # revoked keys do not count

    table = _keys(engine)
    assert authenticate(table, PEPPER, active.secret).key_id == active.key_id
    for created, message in [
        (expired, "expired"),
        (user_off, r"not active \(user disabled\)"),
        (team_off, r"not active \(team disabled\)"),
    ]:
        with pytest.raises(AuthenticationFailed, match=message):
            authenticate(table, PEPPER, created.secret)

    # Re-enabling brings the keys back.
    accounts.set_team_disabled(engine, "off", False)
    assert _state(engine, team_off.display_prefix) == "active"
    assert authenticate(_keys(engine), PEPPER, team_off.secret).team_name == "off"
