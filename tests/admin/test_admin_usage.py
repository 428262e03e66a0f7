"""Usage reports over the rollups equal a GROUP BY over the raw ledger after real traffic, for every grouping, in
JSON and CSV; team admins get their own team's numbers only."""

from __future__ import annotations

import csv
import io
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import sqlalchemy as sa

from gateway.auth.keys import display_prefix
from gateway.db.schema import teams, usage_rollups, users
from tests.admin.conftest import TeamAdmin, client
from tests.conftest import wait_key_known
from tests.harness import Database, Gateway, wait_for

SUMS = ("requests", "errors", "prompt_tokens", "completion_tokens", "cost_nanousd")


def traffic(gateway: Gateway, tenant: TeamAdmin) -> list[str]:
    """A mix of models, end users, streaming and an error; returns the gateway request ids."""
    ids = []
    for index in range(6):
        body: dict[str, Any] = {
            "model": ("mock-small", "mock-large")[index % 2],
            "messages": [{"role": "user", "content": "word " * (index + 1)}],
            "max_tokens": 3 + index,
            "user": f"end-user-{index % 3}",
            "stream": index == 4,
        }
        key = tenant.member_key if index % 3 else tenant.key
        response = httpx.post(
            f"{gateway.base_url}/chat/completions", headers={"Authorization": f"Bearer {key}"}, json=body
        )
        assert response.status_code == 200, response.text
        ids.append(response.headers["x-gateway-request-id"])
    failed = httpx.post(
        f"{gateway.base_url}/chat/completions",
        headers={"Authorization": f"Bearer {tenant.key}"},
        json={"model": "mock-dead", "messages": [{"role": "user", "content": "x"}]},
    )
    assert failed.status_code == 502
    ids.append(failed.headers["x-gateway-request-id"])
    return ids


def ledger_rows(database: Database, team: str) -> list[dict[str, Any]]:
    with database.engine.connect() as connection:
        team_id = connection.execute(sa.select(teams.c.id).where(teams.c.name == team)).scalar()
        names = dict(connection.execute(sa.select(users.c.id, users.c.name)).all())
    rows = [row for row in database.usage_rows() if row["team_id"] == team_id]
    for row in rows:
        row["team"], row["user"] = team, names.get(row["user_id"])
        row["key"] = display_prefix(row["key_id"]) if row["key_id"] else None
        row["day"] = row["started_at"].date().isoformat()
        row["requests"], row["errors"] = 1, int(row["status_code"] >= 400)
    return rows


def expected(rows: list[dict[str, Any]], group_by: tuple[str, ...]) -> dict[tuple[Any, ...], dict[str, int]]:
    """The reference: a GROUP BY over the raw ledger rows."""
    totals: dict[tuple[Any, ...], dict[str, int]] = defaultdict(lambda: dict.fromkeys(SUMS, 0))
    for row in rows:
        labels = [row[name] for name in group_by if name != "tag"]
        for tag in (row["tags"] or [None]) if "tag" in group_by else [None]:
            key = tuple(labels) if "tag" not in group_by else (*labels, tag)
            if "tag" in group_by and tag is None:
                continue
            for name in SUMS:
                totals[key][name] += row[name]
    return dict(totals)


def reported(report: dict[str, Any], group_by: tuple[str, ...]) -> dict[tuple[Any, ...], dict[str, int]]:
    order = [name for name in group_by if name != "tag"] + (["tag"] if "tag" in group_by else [])
    return {tuple(row[name] for name in order): {name: row[name] for name in SUMS} for row in report["rows"]}


def wait_for_ledger(database: Database, team: str, count: int) -> list[dict[str, Any]]:
    def rolled_up() -> list[dict[str, Any]] | None:
        rows = ledger_rows(database, team)
        if len(rows) < count:
            return None
        with database.engine.connect() as connection:
            requests = connection.execute(
                sa.select(sa.func.coalesce(sa.func.sum(usage_rollups.c.requests), 0)).where(
                    usage_rollups.c.team_id == rows[0]["team_id"], usage_rollups.c.granularity == "hour"
                )
            ).scalar()
        return rows if requests == len(rows) else None

    return wait_for(rolled_up, timeout=15, what="the ledger rows and their rollups")


def test_usage_report_equals_group_by_over_the_ledger(
    admin_gateway: Gateway, database: Database, org: httpx.Client, lead: TeamAdmin, other: TeamAdmin
) -> None:
    for tenant in (lead, other):
        wait_key_known(admin_gateway, tenant.key)
        wait_key_known(admin_gateway, tenant.member_key)
    ids = traffic(admin_gateway, lead)
    traffic(admin_gateway, other)
    rows = wait_for_ledger(database, lead.team, len(ids))
    assert len(rows) == len(ids)
    wait_for_ledger(database, other.team, len(ids))

    today = datetime.now(UTC).date()
    window = {"from": today.isoformat(), "to": (today + timedelta(days=1)).isoformat(), "team": lead.team}
    for group_by in [
        ("team",),
        ("user",),
        ("key",),
        ("model",),
        ("day",),
        ("tag",),
        ("end_user",),
        ("day", "model"),
        ("key", "model"),
        ("team", "tag"),
    ]:
        report = org.get("/admin/usage", params={**window, "group_by": ",".join(group_by)}).json()
        if "end_user" in group_by:
            assert report["resolution"] == "exact"
        else:
            assert report["resolution"] == "day"
        assert reported(report, group_by) == expected(rows, group_by), group_by

    # Hourly resolution over a range that is not whole days: the same totals.
    hourly = org.get(
        "/admin/usage",
        params={
            "team": lead.team,
            "group_by": "model",
            "from": (datetime.now(UTC) - timedelta(hours=2)).isoformat(),
            "to": (datetime.now(UTC) + timedelta(minutes=5)).isoformat(),
        },
    ).json()
    assert hourly["resolution"] == "hour"
    assert reported(hourly, ("model",)) == expected(rows, ("model",))

    # A team admin gets the same numbers for its team, and only its team.
    with client(admin_gateway, lead.key) as http:
        own = http.get("/admin/usage", params={"group_by": "team", "from": window["from"], "to": window["to"]}).json()
    assert reported(own, ("team",)) == expected(rows, ("team",))

    # CSV carries the same rows.
    response = org.get("/admin/usage", params={**window, "group_by": "key,model", "format": "csv"})
    assert response.headers["content-type"].startswith("text/csv")
    parsed = list(csv.DictReader(io.StringIO(response.text)))
    as_json = org.get("/admin/usage", params={**window, "group_by": "key,model"}).json()["rows"]
    assert [(row["key"], row["model"], int(row["cost_nanousd"]), row["cost_usd"]) for row in parsed] == [
        (row["key"], row["model"], row["cost_nanousd"], row["cost_usd"]) for row in as_json
    ]

    # Top consumers: the N largest by cost.
    top = org.get("/admin/usage", params={**window, "group_by": "key", "limit": "1"}).json()["rows"]
    by_key = expected(rows, ("key",))
    assert len(top) == 1 and top[0]["cost_nanousd"] == max(value["cost_nanousd"] for value in by_key.values())


def test_usage_arguments_are_validated(org: httpx.Client) -> None:
    for params in (
        {"group_by": "planet"},
        {"from": "yesterday"},
        {"from": "2026-01-02", "to": "2026-01-01"},
        {"group_by": "tag,key"},
        {"group_by": "tag,end_user"},
        {"limit": "0"},
    ):
        response = org.get("/admin/usage", params=params)
        assert response.status_code == 400, params
        assert response.json()["error"]["type"] == "invalid_request_error"
