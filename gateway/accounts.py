"""Teams, users and API keys in SQL: the operations behind the CLI (and later the admin API).

Every change bumps the shared cache version in the same transaction, so every gateway process picks it up
within one poll interval. Secrets are returned once, at creation, and never stored.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa

from gateway.auth import keys
from gateway.db.engine import as_utc, utcnow
from gateway.db.schema import api_keys, teams, users
from gateway.snapshot import bump_version


class AccountError(Exception):
    """A request the operator must correct (unknown team, duplicate name, ...)."""


_DURATION = re.compile(r"^\s*(\d+)\s*([smhdw])\s*$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_duration(text: str) -> timedelta:
    match = _DURATION.match(text)
    if not match:
        raise AccountError(f"cannot read duration {text!r}: use e.g. 90m, 12h, 30d, 2w")
    return timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})


def _team_id(connection: sa.Connection, name: str) -> int:
    team_id = connection.execute(sa.select(teams.c.id).where(teams.c.name == name)).scalar()
    if team_id is None:
        raise AccountError(f"team {name!r} does not exist (create it with: gateway teams create {name})")
    return int(team_id)


def _user_id(connection: sa.Connection, name: str) -> int:
    user_id = connection.execute(sa.select(users.c.id).where(users.c.name == name)).scalar()
    if user_id is None:
        raise AccountError(f"user {name!r} does not exist (create it with: gateway users create {name})")
    return int(user_id)


def _insert_unique(connection: sa.Connection, statement: sa.Insert, what: str) -> int:
    try:
        with connection.begin_nested():
            result = connection.execute(statement)
    except sa.exc.IntegrityError:
        raise AccountError(f"{what} already exists") from None
    primary_key = result.inserted_primary_key
    assert primary_key is not None
    return int(primary_key[0])


# --- teams -----------------------------------------------------------------------------------------------


def create_team(engine: sa.Engine, name: str) -> int:
    with engine.begin() as connection:
        team_id = _insert_unique(connection, teams.insert().values(name=name, created_at=utcnow()), f"team {name!r}")
        bump_version(connection)
        return team_id


def ensure_team(engine: sa.Engine, name: str) -> int:
    with engine.connect() as connection:
        existing = connection.execute(sa.select(teams.c.id).where(teams.c.name == name)).scalar()
    return int(existing) if existing is not None else create_team(engine, name)


def set_team_disabled(engine: sa.Engine, name: str, disabled: bool) -> None:
    with engine.begin() as connection:
        team_id = _team_id(connection, name)
        connection.execute(teams.update().where(teams.c.id == team_id).values(disabled=disabled))
        bump_version(connection)


def list_teams(engine: sa.Engine) -> list[dict[str, Any]]:
    key_count = (
        sa.select(sa.func.count())
        .where(api_keys.c.team_id == teams.c.id, api_keys.c.revoked_at.is_(None))
        .scalar_subquery()
    )
    query = sa.select(teams, key_count.label("active_keys")).order_by(teams.c.name)
    with engine.connect() as connection:
        return [dict(row) for row in connection.execute(query).mappings()]


# --- users -----------------------------------------------------------------------------------------------


def create_user(engine: sa.Engine, name: str, email: str | None = None) -> int:
    with engine.begin() as connection:
        user_id = _insert_unique(
            connection, users.insert().values(name=name, email=email, created_at=utcnow()), f"user {name!r}"
        )
        bump_version(connection)
        return user_id


def ensure_user(engine: sa.Engine, name: str) -> int:
    with engine.connect() as connection:
        existing = connection.execute(sa.select(users.c.id).where(users.c.name == name)).scalar()
    return int(existing) if existing is not None else create_user(engine, name)


def set_user_disabled(engine: sa.Engine, name: str, disabled: bool) -> None:
    with engine.begin() as connection:
        user_id = _user_id(connection, name)
        connection.execute(users.update().where(users.c.id == user_id).values(disabled=disabled))
        bump_version(connection)


def list_users(engine: sa.Engine) -> list[dict[str, Any]]:
    with engine.connect() as connection:
        return [dict(row) for row in connection.execute(sa.select(users).order_by(users.c.name)).mappings()]


# --- keys ------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CreatedKey:
    key_id: str
    secret: str
    display_prefix: str
    team: str
    user: str | None
    expires_at: datetime | None


def create_key(
    engine: sa.Engine,
    pepper: bytes,
    *,
    team: str,
    user: str | None = None,
    models: list[str] | None = None,
    expires_in: timedelta | None = None,
    name: str | None = None,
    tags: list[str] | None = None,
) -> CreatedKey:
    now = utcnow()
    expires_at = now + expires_in if expires_in is not None else None
    with engine.begin() as connection:
        team_id = _team_id(connection, team)
        user_id = _user_id(connection, user) if user else None
        for _ in range(5):  # the public id is random; a clash is astronomically rare but cheap to retry
            new_key = keys.generate()
            try:
                with connection.begin_nested():
                    connection.execute(
                        api_keys.insert().values(
                            id=new_key.key_id,
                            secret_hmac=keys.hash_key(pepper, new_key.secret),
                            name=name,
                            team_id=team_id,
                            user_id=user_id,
                            allowed_models=sorted(set(models)) if models else None,
                            tags=sorted(set(tags)) if tags else None,
                            created_at=now,
                            expires_at=expires_at,
                        )
                    )
                break
            except sa.exc.IntegrityError:
                continue
        else:
            raise AccountError("could not allocate a unique key id")
        bump_version(connection)
    return CreatedKey(
        key_id=new_key.key_id,
        secret=new_key.secret,
        display_prefix=new_key.display_prefix,
        team=team,
        user=user,
        expires_at=expires_at,
    )


def key_state(row: Any, now: datetime) -> str:
    """What a key row (from `key_rows`) amounts to: active, revoked, expired, team disabled or user disabled."""
    if row["revoked_at"] is not None:
        return "revoked"
    if row["team_disabled"]:
        return "team disabled"
    if row["user_disabled"]:
        return "user disabled"
    expires_at = as_utc(row["expires_at"])
    if expires_at is not None and expires_at <= now:
        return "expired"
    return "active"


def key_rows() -> sa.Select[Any]:
    """Keys with what their state depends on (team, user): for listings here and in the admin API."""
    return (
        sa.select(
            api_keys.c.id,
            api_keys.c.name,
            api_keys.c.allowed_models,
            api_keys.c.tags,
            api_keys.c.team_admin,
            api_keys.c.team_id,
            api_keys.c.created_at,
            api_keys.c.last_used_at,
            api_keys.c.expires_at,
            api_keys.c.revoked_at,
            teams.c.name.label("team"),
            teams.c.disabled.label("team_disabled"),
            users.c.name.label("user"),
            users.c.disabled.label("user_disabled"),
        )
        .join(teams, teams.c.id == api_keys.c.team_id)
        .outerjoin(users, users.c.id == api_keys.c.user_id)
    )


def list_keys(engine: sa.Engine, *, team: str | None = None) -> list[dict[str, Any]]:
    query = key_rows().order_by(api_keys.c.created_at)
    if team is not None:
        query = query.where(teams.c.name == team)
    now = utcnow()
    with engine.connect() as connection:
        rows = connection.execute(query).mappings().all()
    return [
        {
            "prefix": keys.display_prefix(row["id"]),
            "name": row["name"],
            "team": row["team"],
            "user": row["user"],
            "models": row["allowed_models"],
            "created_at": as_utc(row["created_at"]),
            "last_used_at": as_utc(row["last_used_at"]),
            "expires_at": as_utc(row["expires_at"]),
            "state": key_state(row, now),
        }
        for row in rows
    ]


def key_id_from(reference: str) -> str:
    """Accept a key id, its display prefix, or the whole key (never stored, only parsed)."""
    reference = reference.strip()
    if reference.startswith(keys.PREFIX):
        reference = reference[len(keys.PREFIX) :][: keys.ID_LENGTH]
    return reference


def revoke_key(engine: sa.Engine, reference: str) -> str:
    key_id = key_id_from(reference)
    with engine.begin() as connection:
        result = connection.execute(
            api_keys.update()
            .where(api_keys.c.id == key_id, api_keys.c.revoked_at.is_(None))
            .values(revoked_at=utcnow())
        )
        if result.rowcount == 0:
            exists = connection.execute(sa.select(api_keys.c.id).where(api_keys.c.id == key_id)).scalar()
            raise AccountError(f"key {reference!r} " + ("is already revoked" if exists else "does not exist"))
        bump_version(connection)
    return keys.display_prefix(key_id)
