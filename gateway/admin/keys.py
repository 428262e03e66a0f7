"""API keys through the admin API: create (the secret is returned once), list (prefixes only), revoke, rotate.

Rotation issues a new key with the old one's team, user, models, tags, name, team-admin flag and key limits, and
makes the old key expire after an overlap period, so clients can switch without downtime.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import sqlalchemy as sa

from gateway import accounts
from gateway.accounts import key_rows, key_state
from gateway.admin import audit
from gateway.admin.errors import AdminNotFound, Conflict, Forbidden
from gateway.admin.principal import Principal
from gateway.admin.teams import team_user_ids
from gateway.admin.txn import in_transaction
from gateway.auth import keys as key_format
from gateway.db.engine import as_utc, utcnow
from gateway.db.schema import api_keys, limit_overrides, teams, users
from gateway.snapshot import bump_version


def _query() -> sa.Select[Any]:
    return key_rows()


def _state(row: Any) -> str:
    return key_state(row, utcnow())


def _out(row: Any) -> dict[str, Any]:
    return {
        "prefix": key_format.display_prefix(row["id"]),
        "name": row["name"],
        "team": row["team"],
        "user": row["user"],
        "models": row["allowed_models"],
        "tags": row["tags"] or [],
        "team_admin": bool(row["team_admin"]),
        "created_at": as_utc(row["created_at"]),
        "last_used_at": as_utc(row["last_used_at"]),
        "expires_at": as_utc(row["expires_at"]),
        "revoked_at": as_utc(row["revoked_at"]),
        "state": _state(row),
    }


def list_keys(connection: sa.Connection, principal: Principal, team_id: int | None) -> list[dict[str, Any]]:
    query = _query().order_by(api_keys.c.created_at, api_keys.c.id)
    team_id = principal.team_filter(team_id)
    if team_id is not None:
        query = query.where(api_keys.c.team_id == team_id)
    return [_out(row) for row in connection.execute(query).mappings()]


def _row(connection: sa.Connection, principal: Principal, reference: str) -> Any:
    key_id = accounts.key_id_from(reference)
    row = connection.execute(_query().where(api_keys.c.id == key_id)).mappings().first()
    if row is None:
        principal.require_org_admin("look up keys of other teams")
        raise AdminNotFound(f"Key '{reference}' does not exist.")
    principal.require_team(row["team_id"])
    return row


def get_key(connection: sa.Connection, principal: Principal, reference: str) -> dict[str, Any]:
    return _out(_row(connection, principal, reference))


def _team_id(connection: sa.Connection, principal: Principal, team: str | None) -> tuple[int, str]:
    if team is None:
        if principal.team_id is None or principal.team_name is None:
            raise Forbidden("Say which team the key is for.")  # org admins must name it
        return principal.team_id, principal.team_name
    found = connection.execute(sa.select(teams.c.id).where(teams.c.name == team)).scalar()
    if found is None:
        principal.require_org_admin("create keys for other teams")
        raise AdminNotFound(f"Team '{team}' does not exist.", param="team")
    principal.require_team(int(found))
    return int(found), team


def _check_user(connection: sa.Connection, principal: Principal, team_id: int, user: str) -> None:
    query = sa.select(users.c.id).where(users.c.name == user)
    if not principal.is_org_admin:  # team admins may only name users who already hold a key of their team
        query = query.where(users.c.id.in_(team_user_ids(team_id)))
    if connection.execute(query).scalar() is None:
        if not principal.is_org_admin:
            raise Forbidden("Team admins may only create keys for users of their own team.")
        raise AdminNotFound(f"User '{user}' does not exist.", param="user")


def create_key(
    connection: sa.Connection,
    principal: Principal,
    pepper: bytes,
    *,
    team: str | None,
    user: str | None,
    models: list[str] | None,
    expires_in: timedelta | None,
    name: str | None,
    tags: list[str] | None,
    team_admin: bool,
    request_id: str,
    action: str = "key.create",
    rotating: bool = False,
) -> dict[str, Any]:
    team_id, team_name = _team_id(connection, principal, team)
    if team_admin and not rotating:  # a rotation keeps the flag of a key the caller may already manage
        principal.require_org_admin("create team admin keys")
    if user is not None:
        _check_user(connection, principal, team_id, user)
    created = accounts.create_key(
        in_transaction(connection),
        pepper,
        team=team_name,
        user=user,
        models=models,
        expires_in=expires_in,
        name=name,
        tags=tags,
    )
    if team_admin:
        connection.execute(api_keys.update().where(api_keys.c.id == created.key_id).values(team_admin=True))
    listed = get_key(connection, principal, created.key_id)
    audit.record(
        connection,
        principal,
        action,
        f"key:{created.display_prefix}",
        team_id=team_id,
        after=listed,
        request_id=request_id,
    )
    return {**listed, "key": created.secret}


def revoke_key(connection: sa.Connection, principal: Principal, reference: str, request_id: str) -> dict[str, Any]:
    row = _row(connection, principal, reference)
    if row["revoked_at"] is not None:
        raise Conflict(f"Key '{key_format.display_prefix(row['id'])}' is already revoked.")
    before = _out(row)
    accounts.revoke_key(in_transaction(connection), row["id"])
    after = get_key(connection, principal, row["id"])
    audit.record(
        connection,
        principal,
        "key.revoke",
        f"key:{after['prefix']}",
        team_id=row["team_id"],
        before=before,
        after=after,
        request_id=request_id,
    )
    return after


def rotate_key(
    connection: sa.Connection,
    principal: Principal,
    pepper: bytes,
    reference: str,
    overlap: timedelta,
    request_id: str,
) -> dict[str, Any]:
    row = _row(connection, principal, reference)
    if _state(row) != "active":
        raise Conflict(f"Key '{key_format.display_prefix(row['id'])}' is {_state(row)}: only active keys rotate.")
    before = _out(row)
    created_at, expires_at = as_utc(row["created_at"]), as_utc(row["expires_at"])
    lifetime = expires_at - created_at if expires_at is not None and created_at is not None else None
    new = create_key(
        connection,
        principal,
        pepper,
        team=row["team"],
        user=row["user"],
        models=row["allowed_models"],
        expires_in=lifetime,
        name=row["name"],
        tags=row["tags"],
        team_admin=bool(row["team_admin"]),
        request_id=request_id,
        action="key.rotate.new",
        rotating=True,
    )
    _copy_key_limits(connection, row["id"], accounts.key_id_from(new["prefix"]))
    old_expiry = utcnow() + overlap
    if expires_at is None or expires_at > old_expiry:
        connection.execute(api_keys.update().where(api_keys.c.id == row["id"]).values(expires_at=old_expiry))
    bump_version(connection)
    after = get_key(connection, principal, row["id"])
    audit.record(
        connection,
        principal,
        "key.rotate",
        f"key:{before['prefix']}",
        team_id=row["team_id"],
        before=before,
        after={**after, "replaced_by": new["prefix"]},
        request_id=request_id,
    )
    return {"old": after, "new": new}


def _copy_key_limits(connection: sa.Connection, old_id: str, new_id: str) -> None:
    row = (
        connection.execute(
            sa.select(limit_overrides).where(limit_overrides.c.scope == "key", limit_overrides.c.scope_id == old_id)
        )
        .mappings()
        .first()
    )
    if row is not None:
        values = {name: value for name, value in row.items() if name != "id"}
        connection.execute(limit_overrides.insert().values(**{**values, "scope_id": new_id, "updated_at": utcnow()}))
