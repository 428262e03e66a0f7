"""Limit and budget overrides through the admin API: read, set, clear. The changes themselves are
`gateway.limits.overrides` (shared with the CLI), run in the audit row's transaction.

Who may change what: organisation admins every scope; team admins only the keys of their own team (sharing out
the team's quota among its keys). The team's own limits are what the organisation grants it, and a user's limits
apply in every team, so neither is a team admin's to change.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from gateway.admin import audit
from gateway.admin.errors import AdminNotFound
from gateway.admin.principal import Principal
from gateway.admin.txn import in_transaction
from gateway.auth import keys as key_format
from gateway.db.schema import api_keys, limit_overrides, teams, users
from gateway.errors import InvalidRequest
from gateway.limits import overrides
from gateway.limits.policy import UNLIMITED

VALUE_FIELDS = overrides.VALUE_FIELDS


def _out(row: Any, names: dict[str, dict[str, str]]) -> dict[str, Any]:
    scope, scope_id = row["scope"], row["scope_id"]
    if scope in ("team", "team_model"):
        subject = names["team"].get(scope_id, scope_id)
    elif scope == "user":
        subject = names["user"].get(scope_id, scope_id)
    elif scope == "key":
        subject = key_format.display_prefix(scope_id)
    else:
        subject = scope_id
    entry: dict[str, Any] = {"scope": scope, "subject": subject, "model": row["model"] or None}
    for name in VALUE_FIELDS:
        value = row[name]
        entry[name] = "unlimited" if value == UNLIMITED else value
    return entry


def _names(connection: sa.Connection) -> dict[str, dict[str, str]]:
    return {
        "team": {str(id_): name for id_, name in connection.execute(sa.select(teams.c.id, teams.c.name))},
        "user": {str(id_): name for id_, name in connection.execute(sa.select(users.c.id, users.c.name))},
    }


def list_limits(connection: sa.Connection, principal: Principal, team_id: int | None) -> list[dict[str, Any]]:
    query = sa.select(limit_overrides).order_by(limit_overrides.c.id)
    team_id = principal.team_filter(team_id)
    if team_id is not None:
        team_keys = sa.select(api_keys.c.id).where(api_keys.c.team_id == team_id)
        query = query.where(
            sa.or_(
                sa.and_(
                    limit_overrides.c.scope.in_(("team", "team_model")), limit_overrides.c.scope_id == str(team_id)
                ),
                sa.and_(limit_overrides.c.scope == "key", limit_overrides.c.scope_id.in_(team_keys)),
            )
        )
    names = _names(connection)
    return [_out(row, names) for row in connection.execute(query).mappings()]


def _authorize(connection: sa.Connection, principal: Principal, scope: str, subject: str) -> int | None:
    """The team the override belongs to (None for user and model scopes), after the role check."""
    if scope not in overrides.SCOPES:
        raise AdminNotFound(f"Unknown limit scope '{scope}'; one of {', '.join(overrides.SCOPES)}.", param="scope")
    if scope == "key":
        key_id = subject.removeprefix(key_format.PREFIX)[: key_format.ID_LENGTH]
        team_id = connection.execute(sa.select(api_keys.c.team_id).where(api_keys.c.id == key_id)).scalar()
        if team_id is None:
            principal.require_org_admin("change limits outside their team")
            raise AdminNotFound(f"Key '{subject}' does not exist.")
        principal.require_team(int(team_id))
        return int(team_id)
    principal.require_org_admin(f"change {scope.replace('_', ' x ')} limits")
    if scope in ("team", "team_model"):
        team_id = connection.execute(sa.select(teams.c.id).where(teams.c.name == subject)).scalar()
        if team_id is None:
            raise AdminNotFound(f"Team '{subject}' does not exist.")
        return int(team_id)
    return None


def _current(connection: sa.Connection, scope: str, subject: str, model: str) -> dict[str, Any] | None:
    scope_id = overrides.scope_id(connection, scope, subject)
    row = (
        connection.execute(
            sa.select(limit_overrides).where(
                limit_overrides.c.scope == scope,
                limit_overrides.c.scope_id == scope_id,
                limit_overrides.c.model == model,
            )
        )
        .mappings()
        .first()
    )
    return _out(row, _names(connection)) if row is not None else None


def set_limits(
    connection: sa.Connection,
    principal: Principal,
    scope: str,
    subject: str,
    model: str,
    values: dict[str, Any],
    request_id: str,
) -> dict[str, Any]:
    team_id = _authorize(connection, principal, scope, subject)
    before = _current(connection, scope, subject, model)
    try:
        overrides.set_override(in_transaction(connection), scope, subject, values, model=model)
    except overrides.OverrideError as exc:
        raise InvalidRequest(str(exc)) from exc
    after = _current(connection, scope, subject, model)
    assert after is not None
    audit.record(
        connection,
        principal,
        "limits.set",
        f"{scope}:{subject}" + (f"/{model}" if model else ""),
        team_id=team_id,
        before=before,
        after=after,
        request_id=request_id,
    )
    return after


def clear_limits(
    connection: sa.Connection, principal: Principal, scope: str, subject: str, model: str, request_id: str
) -> bool:
    team_id = _authorize(connection, principal, scope, subject)
    before = _current(connection, scope, subject, model)
    if before is None:
        return False
    overrides.clear_override(in_transaction(connection), scope, subject, model=model)
    audit.record(
        connection,
        principal,
        "limits.clear",
        f"{scope}:{subject}" + (f"/{model}" if model else ""),
        team_id=team_id,
        before=before,
        after=None,
        request_id=request_id,
    )
    return True
