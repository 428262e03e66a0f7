"""Limit overrides in SQL: set, clear and list them (the CLI now, the admin API later). Changes bump the shared
cache version, so every gateway process applies them within a poll interval, without a restart."""

from __future__ import annotations

from dataclasses import fields
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from gateway.db.engine import utcnow
from gateway.db.schema import api_keys, limit_overrides, teams, users
from gateway.limits.policy import UNLIMITED, Override
from gateway.snapshot import bump_version

SCOPES = ("key", "user", "team", "team_model", "model")
VALUE_FIELDS = tuple(field.name for field in fields(Override))


class OverrideError(Exception):
    """The override cannot be applied as asked; the message says why."""


def scope_id(connection: sa.Connection, scope: str, subject: str) -> str:
    """Turn a team/user name, a key prefix or a model name into the id the override row stores."""
    if scope in ("team", "team_model"):
        found = connection.execute(sa.select(teams.c.id).where(teams.c.name == subject)).scalar()
    elif scope == "user":
        found = connection.execute(sa.select(users.c.id).where(users.c.name == subject)).scalar()
    elif scope == "key":
        key_id = subject.removeprefix("sk-gw-")[:12]
        found = connection.execute(sa.select(api_keys.c.id).where(api_keys.c.id == key_id)).scalar()
    else:
        return subject
    if found is None:
        raise OverrideError(f"{scope.replace('_model', '')} {subject!r} does not exist")
    return str(found)


def set_override(engine: sa.Engine, scope: str, subject: str, values: dict[str, Any], *, model: str = "") -> None:
    """Upsert the fields given (None: inherit the configured default, UNLIMITED: no limit)."""
    if scope not in SCOPES:
        raise OverrideError(f"unknown scope {scope!r}; one of {', '.join(SCOPES)}")
    if (scope == "team_model") != bool(model):
        raise OverrideError("a model is needed for team_model overrides, and only for them")
    unknown = set(values) - set(VALUE_FIELDS)
    if unknown:
        raise OverrideError(f"unknown limit fields: {', '.join(sorted(unknown))}")
    for name, value in values.items():
        if name == "budget_mode":
            if value not in (None, "hard", "soft"):
                raise OverrideError("budget_mode is hard or soft")
        elif value is not None and (not isinstance(value, int) or value < UNLIMITED):
            raise OverrideError(f"{name} must be a non-negative integer, or unlimited")
    with engine.begin() as connection:
        row = {"scope": scope, "scope_id": scope_id(connection, scope, subject), "model": model, **values}
        dialect = postgresql if engine.dialect.name == "postgresql" else sqlite
        statement = dialect.insert(limit_overrides).values(**row, updated_at=utcnow())
        statement = statement.on_conflict_do_update(
            index_elements=["scope", "scope_id", "model"],
            set_={**{name: statement.excluded[name] for name in values}, "updated_at": statement.excluded.updated_at},
        )
        connection.execute(statement)
        bump_version(connection)


def clear_override(engine: sa.Engine, scope: str, subject: str, *, model: str = "") -> bool:
    with engine.begin() as connection:
        result = connection.execute(
            limit_overrides.delete().where(
                limit_overrides.c.scope == scope,
                limit_overrides.c.scope_id == scope_id(connection, scope, subject),
                limit_overrides.c.model == model,
            )
        )
        bump_version(connection)
        return bool(result.rowcount)


def list_overrides(engine: sa.Engine) -> list[dict[str, Any]]:
    with engine.connect() as connection:
        rows = connection.execute(sa.select(limit_overrides).order_by(limit_overrides.c.id)).mappings().all()
        team_names = dict(connection.execute(sa.select(teams.c.id, teams.c.name)).all())
        user_names = dict(connection.execute(sa.select(users.c.id, users.c.name)).all())
    listed = []
    for row in rows:
        subject = row["scope_id"]
        if row["scope"] in ("team", "team_model"):
            subject = team_names.get(int(subject), subject)
        elif row["scope"] == "user":
            subject = user_names.get(int(subject), subject)
        elif row["scope"] == "key":
            subject = f"sk-gw-{subject}"
        entry = {"scope": row["scope"], "subject": subject, "model": row["model"] or None}
        for name in VALUE_FIELDS:
            value = row[name]
            entry[name] = "unlimited" if value == UNLIMITED else value
        listed.append(entry)
    return listed
