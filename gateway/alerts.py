"""Budget threshold alerts: when a budget's use crosses a threshold (50/80/100 % by default), a webhook is sent,
at most once per threshold and period, signed and retried; the dashboard shows every alert.

How several processes and replicas agree: each evaluates budgets every `alerts.interval` seconds and inserts one
row per crossed threshold into `budget_alerts`, whose unique key (scope, metric, period, threshold) lets only the
first insert win. The row is also the delivery outbox: a process claims a due row by moving its next attempt
forward in one conditional UPDATE, posts it, and records the result; a row left by a process that died is due
again once that claim lapses. When several thresholds are crossed at once only the highest is sent; the lower
ones are recorded as superseded.

The webhook (POST, JSON) carries `X-Gateway-Signature: sha256=<hex HMAC-SHA-256(secret, "<timestamp>.<body>")>`,
`X-Gateway-Timestamp` and `X-Gateway-Delivery` (the alert id: a receiver deduplicates on it, since a delivery whose
acknowledgement was lost is retried).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import time
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from typing import Any

import aiohttp
import orjson
import sqlalchemy as sa
from aiohttp import web
from sqlalchemy.dialects import postgresql, sqlite

from gateway import metrics
from gateway.admin.budgets import BudgetUse, budget_uses
from gateway.db.engine import as_utc, utcnow
from gateway.db.schema import budget_alerts, teams
from gateway.settings import Alerts, Limits
from gateway.state import STATE, GatewayState

log = logging.getLogger(__name__)

PENDING, DELIVERED, FAILED, RECORDED, SUPERSEDED = "pending", "delivered", "failed", "recorded", "superseded"


def sign(secret: str, timestamp: str, body: bytes) -> str:
    digest = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"sha256={digest}"


def verify(secret: str, timestamp: str, body: bytes, signature: str) -> bool:
    """For receivers (and tests): constant-time check of a delivery's signature."""
    return hmac.compare_digest(sign(secret, timestamp, body), signature)


# --- evaluation (SQL thread) ---------------------------------------------------------------------------------


def crossed(use: BudgetUse, thresholds: list[int]) -> list[int]:
    return [threshold for threshold in thresholds if use.used * 100 >= threshold * use.limit]


def record_crossings(
    engine: sa.Engine,
    limits: Limits,
    overrides: Any,
    thresholds: list[int],
    *,
    deliver: bool,
    now: float | None = None,
) -> int:
    """Insert an alert row for every newly crossed threshold; returns how many rows this call inserted."""
    dialect = postgresql if engine.dialect.name == "postgresql" else sqlite
    inserted = 0
    with engine.begin() as connection:
        for use in budget_uses(connection, limits, overrides, now=now):
            hit = crossed(use, thresholds)
            for threshold in hit:
                highest = threshold == hit[-1]
                status = (PENDING if deliver else RECORDED) if highest else SUPERSEDED
                statement = (
                    dialect.insert(budget_alerts)
                    .values(
                        scope=use.scope,
                        scope_id=use.scope_id,
                        team_id=use.team_id,
                        metric=use.metric,
                        period=use.period,
                        threshold=threshold,
                        used=use.used,
                        limit=use.limit,
                        created_at=utcnow(),
                        status=status,
                        next_attempt_at=utcnow() if status == PENDING else None,
                    )
                    .on_conflict_do_nothing(index_elements=["scope", "scope_id", "metric", "period", "threshold"])
                )
                if connection.execute(statement).rowcount:
                    inserted += 1
                    metrics.BUDGET_ALERTS.labels(use.scope, use.metric, str(threshold)).inc()
    return inserted


def claim_due(engine: sa.Engine, lease: float, batch: int = 20) -> list[dict[str, Any]]:
    """Claim pending deliveries that are due: each claim is a conditional UPDATE that only one process wins."""
    now = utcnow()
    claimed = []
    with engine.begin() as connection:
        due = (
            connection.execute(
                sa.select(budget_alerts.c.id)
                .where(budget_alerts.c.status == PENDING, budget_alerts.c.next_attempt_at <= now)
                .order_by(budget_alerts.c.next_attempt_at)
                .limit(batch)
            )
            .scalars()
            .all()
        )
    for alert_id in due:
        with engine.begin() as connection:
            result = connection.execute(
                budget_alerts.update()
                .where(
                    budget_alerts.c.id == alert_id,
                    budget_alerts.c.status == PENDING,
                    budget_alerts.c.next_attempt_at <= now,
                )
                .values(next_attempt_at=now + timedelta(seconds=lease))
            )
            if result.rowcount:
                claimed.append(_with_team(connection, alert_id))
    return claimed


def _with_team(connection: sa.Connection, alert_id: int) -> dict[str, Any]:
    query = (
        sa.select(budget_alerts, teams.c.name.label("team"))
        .outerjoin(teams, teams.c.id == budget_alerts.c.team_id)
        .where(budget_alerts.c.id == alert_id)
    )
    return dict(connection.execute(query).mappings().one())


def record_attempt(engine: sa.Engine, alert_id: int, *, ok: bool, error: str | None, settings: Alerts) -> str:
    with engine.begin() as connection:
        attempts = (
            int(
                connection.execute(sa.select(budget_alerts.c.attempts).where(budget_alerts.c.id == alert_id)).scalar()
                or 0
            )
            + 1
        )
        if ok:
            values: dict[str, Any] = {"status": DELIVERED, "delivered_at": utcnow(), "last_error": None}
        elif attempts >= settings.max_attempts:
            values = {"status": FAILED, "last_error": (error or "")[:256]}
        else:
            delay = min(settings.backoff * 2 ** (attempts - 1), 3600.0)
            values = {"next_attempt_at": utcnow() + timedelta(seconds=delay), "last_error": (error or "")[:256]}
        connection.execute(
            budget_alerts.update().where(budget_alerts.c.id == alert_id).values(attempts=attempts, **values)
        )
        return str(values.get("status", PENDING))


def list_alerts(connection: sa.Connection, *, team_id: int | None, limit: int = 100) -> list[dict[str, Any]]:
    query = (
        sa.select(budget_alerts, teams.c.name.label("team"))
        .outerjoin(teams, teams.c.id == budget_alerts.c.team_id)
        .order_by(budget_alerts.c.id.desc())
        .limit(limit)
    )
    if team_id is not None:
        query = query.where(budget_alerts.c.team_id == team_id)
    return [
        payload(dict(row))
        | {
            "status": row["status"],
            "attempts": row["attempts"],
            "delivered_at": as_utc(row["delivered_at"]),
            "last_error": row["last_error"],
        }
        for row in connection.execute(query).mappings()
    ]


def payload(row: dict[str, Any]) -> dict[str, Any]:
    created: datetime | None = as_utc(row["created_at"])
    return {
        "id": row["id"],
        "type": "budget.threshold",
        "team": row.get("team"),
        "scope": row["scope"],
        "scope_id": row["scope_id"],
        "metric": row["metric"],
        "period": row["period"],
        "threshold_percent": row["threshold"],
        "used": row["used"],
        "limit": row["limit"],
        "unit": "nanousd" if row["metric"].endswith("cost") else "tokens",
        "created_at": created.isoformat().replace("+00:00", "Z") if created else None,
    }


# --- the background task -----------------------------------------------------------------------------------


class BudgetAlerter:
    def __init__(self, state: GatewayState, session: aiohttp.ClientSession | None) -> None:
        self.state = state
        self.settings = state.settings.alerts
        self.session = session

    async def run_forever(self) -> None:
        database_up = True
        while True:
            try:
                await self.check_once()
            except sa.exc.SQLAlchemyError as exc:  # a database outage: expected, say so once and go on
                if database_up:
                    log.warning("budget alert checks paused: database unavailable (%s)", type(exc).__name__)
                database_up = False
            except Exception:  # anything else is a bug: keep the traceback, keep the task
                log.exception("budget alert check failed")
            else:
                if not database_up:
                    log.info("budget alert checks resumed")
                database_up = True
            await asyncio.sleep(self.settings.interval)

    async def check_once(self) -> None:
        state = self.state
        snapshot = state.snapshot.current
        await state.sql.run(
            record_crossings,
            state.sql.engine,
            state.settings.limits,
            snapshot.overrides,
            self.settings.thresholds,
            deliver=self.session is not None,
        )
        if self.session is None:
            return
        lease = self.settings.timeout * 2 + 5
        for alert in await state.sql.run(claim_due, state.sql.engine, lease):
            ok, error = await self.deliver(alert)
            status = await state.sql.run(
                record_attempt, state.sql.engine, alert["id"], ok=ok, error=error, settings=self.settings
            )
            metrics.ALERT_DELIVERIES.labels("ok" if ok else ("gave_up" if status == FAILED else "retry")).inc()

    async def deliver(self, alert: dict[str, Any]) -> tuple[bool, str | None]:
        assert self.session is not None and self.settings.webhook_url is not None
        body = orjson.dumps(payload(alert))
        timestamp = str(int(time.time()))
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "llm-gateway-alerts",
            "X-Gateway-Event": "budget.threshold",
            "X-Gateway-Delivery": str(alert["id"]),
            "X-Gateway-Timestamp": timestamp,
        }
        if self.settings.secret:
            headers["X-Gateway-Signature"] = sign(self.settings.secret, timestamp, body)
        try:
            async with self.session.post(self.settings.webhook_url, data=body, headers=headers) as response:
                await response.read()
                if 200 <= response.status < 300:
                    return True, None
                return False, f"HTTP {response.status}"
        except (aiohttp.ClientError, TimeoutError) as exc:
            return False, type(exc).__name__


async def alerts_context(app: web.Application) -> AsyncIterator[None]:
    """The alert task and its HTTP client, as a cleanup context (after the database one)."""
    state = app[STATE]
    settings = state.settings.alerts
    if not settings.enabled:
        yield
        return
    session = None
    if settings.webhook_url:
        session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=settings.timeout))
    alerter = BudgetAlerter(state, session)
    task = asyncio.create_task(alerter.run_forever(), name="budget-alerts")
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    if session is not None:
        await session.close()


def setup(app: web.Application) -> None:
    app.cleanup_ctx.append(alerts_context)
