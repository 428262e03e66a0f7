"""The audit log: one row per change made through the admin API or the dashboard.

`record` is called inside the transaction of the change, so a change and its audit row commit (or roll back)
together. Values are made JSON-safe here (datetimes as ISO strings, never secrets: callers pass prefixes).
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any

import sqlalchemy as sa

from gateway.admin.principal import Principal
from gateway.db.engine import as_utc, utcnow
from gateway.db.schema import audit_log


def jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        moment = as_utc(value)
        assert moment is not None
        return moment.isoformat().replace("+00:00", "Z")
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, dict):
        return {str(key): jsonable(item) for key, item in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [jsonable(item) for item in value]
    return value


def record(
    connection: sa.Connection,
    principal: Principal,
    action: str,
    target: str,
    *,
    team_id: int | None,
    before: Any = None,
    after: Any = None,
    request_id: str | None = None,
) -> None:
    connection.execute(
        audit_log.insert().values(
            at=utcnow(),
            actor=principal.actor,
            role=principal.role,
            team_id=team_id,
            action=action,
            target=target,
            before=jsonable(before),
            after=jsonable(after),
            request_id=request_id,
        )
    )


def list_audit(
    connection: sa.Connection, *, team_id: int | None, limit: int = 100, before_id: int | None = None
) -> list[dict[str, Any]]:
    query = sa.select(audit_log).order_by(audit_log.c.id.desc()).limit(limit)
    if team_id is not None:
        query = query.where(audit_log.c.team_id == team_id)
    if before_id is not None:
        query = query.where(audit_log.c.id < before_id)
    return [{**row, "at": as_utc(row["at"])} for row in connection.execute(query).mappings()]
