"""Teams and users, as the admin API sees them. Each change goes through `gateway.accounts` (the one
implementation, shared with the CLI) inside the caller's transaction, next to its audit row."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from gateway import accounts
from gateway.admin import audit
from gateway.admin.errors import AdminNotFound, Conflict
from gateway.admin.principal import Principal
from gateway.admin.txn import in_transaction
from gateway.db.engine import as_utc
from gateway.db.schema import api_keys, teams, users


def _team_columns() -> list[Any]:
    active = (
        sa.select(sa.func.count())
        .where(api_keys.c.team_id == teams.c.id, api_keys.c.revoked_at.is_(None))
        .scalar_subquery()
    )
    return [teams.c.id, teams.c.name, teams.c.disabled, teams.c.created_at, active.label("active_keys")]


def _team_out(row: Any) -> dict[str, Any]:
    return {
        "id": row["id"],
        "name": row["name"],
        "disabled": bool(row["disabled"]),
        "created_at": as_utc(row["created_at"]),
        "active_keys": int(row["active_keys"]),
    }


def find_team(connection: sa.Connection, principal: Principal, name: str) -> dict[str, Any]:
    """The team called `name`, visible to this principal. A team admin asking for another team gets 403 whether
    or not it exists, so names cannot be probed."""
    row = connection.execute(sa.select(*_team_columns()).where(teams.c.name == name)).mappings().first()
    if row is None:
        principal.require_org_admin("look up other teams")
        raise AdminNotFound(f"Team '{name}' does not exist.")
    principal.require_team(row["id"])
    return _team_out(row)


def list_teams(connection: sa.Connection, principal: Principal) -> list[dict[str, Any]]:
    query = sa.select(*_team_columns()).order_by(teams.c.name)
    if not principal.is_org_admin:
        query = query.where(teams.c.id == principal.team_id)
    return [_team_out(row) for row in connection.execute(query).mappings()]


def create_team(connection: sa.Connection, principal: Principal, name: str, request_id: str) -> dict[str, Any]:
    principal.require_org_admin("create teams")
    try:
        team_id = accounts.create_team(in_transaction(connection), name)
    except accounts.AccountError as exc:
        raise Conflict(f"Team '{name}' already exists.", param="name") from exc
    created = find_team(connection, principal, name)
    audit.record(
        connection, principal, "team.create", f"team:{name}", team_id=team_id, after=created, request_id=request_id
    )
    return created


def set_team_disabled(
    connection: sa.Connection, principal: Principal, name: str, disabled: bool, request_id: str
) -> dict[str, Any]:
    principal.require_org_admin("enable or disable teams")
    before = find_team(connection, principal, name)
    accounts.set_team_disabled(in_transaction(connection), name, disabled)
    after = find_team(connection, principal, name)
    audit.record(
        connection,
        principal,
        "team.disable" if disabled else "team.enable",
        f"team:{name}",
        team_id=before["id"],
        before=before,
        after=after,
        request_id=request_id,
    )
    return after


# --- users -----------------------------------------------------------------------------------------------


def _user_out(row: Any) -> dict[str, Any]:
    return {
        "id": row["id"],
        "name": row["name"],
        "email": row["email"],
        "disabled": bool(row["disabled"]),
        "created_at": as_utc(row["created_at"]),
    }


def team_user_ids(team_id: int) -> sa.Select[Any]:
    """Users of a team: those holding a key of it (users are organisation-wide; membership is by key)."""
    return sa.select(api_keys.c.user_id).where(api_keys.c.team_id == team_id, api_keys.c.user_id.is_not(None))


def list_users(connection: sa.Connection, principal: Principal) -> list[dict[str, Any]]:
    query = sa.select(users).order_by(users.c.name)
    if not principal.is_org_admin:
        assert principal.team_id is not None
        query = query.where(users.c.id.in_(team_user_ids(principal.team_id)))
    return [_user_out(row) for row in connection.execute(query).mappings()]


def find_user(connection: sa.Connection, principal: Principal, name: str) -> dict[str, Any]:
    query = sa.select(users).where(users.c.name == name)
    if not principal.is_org_admin:
        assert principal.team_id is not None
        query = query.where(users.c.id.in_(team_user_ids(principal.team_id)))
    row = connection.execute(query).mappings().first()
    if row is None:
        principal.require_org_admin("see users outside their team")
        raise AdminNotFound(f"User '{name}' does not exist.")
    return _user_out(row)


def create_user(
    connection: sa.Connection, principal: Principal, name: str, email: str | None, request_id: str
) -> dict[str, Any]:
    principal.require_org_admin("create users")
    try:
        accounts.create_user(in_transaction(connection), name, email)
    except accounts.AccountError as exc:
        raise Conflict(f"User '{name}' already exists.", param="name") from exc
    created = find_user(connection, principal, name)
    audit.record(
        connection, principal, "user.create", f"user:{name}", team_id=None, after=created, request_id=request_id
    )
    return created


def set_user_disabled(
    connection: sa.Connection, principal: Principal, name: str, disabled: bool, request_id: str
) -> dict[str, Any]:
    principal.require_org_admin("enable or disable users")
    before = find_user(connection, principal, name)
    accounts.set_user_disabled(in_transaction(connection), name, disabled)
    after = find_user(connection, principal, name)
    audit.record(
        connection,
        principal,
        "user.disable" if disabled else "user.enable",
        f"user:{name}",
        team_id=None,
        before=before,
        after=after,
        request_id=request_id,
    )
    return after
