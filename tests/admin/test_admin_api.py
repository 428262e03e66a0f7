"""The admin API, endpoint by endpoint, for both roles: organisation admins see and change everything; team admins
only their own team (anything else is 403 in OpenAI's shape, never another team's data); every change leaves an
audit row."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import sqlalchemy as sa

from gateway.db.schema import audit_log
from gateway.snapshot import read_version
from tests.admin.conftest import ADMIN_KEY, TeamAdmin, client
from tests.conftest import wait_key_known
from tests.harness import Database, Gateway, run_cli, wait_for

CHAT = {"model": "mock-small", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 5}


def chat(gateway: Gateway, key: str, **extra: Any) -> httpx.Response:
    return httpx.post(
        f"{gateway.base_url}/chat/completions", headers={"Authorization": f"Bearer {key}"}, json={**CHAT, **extra}
    )


def assert_openai_error(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


def audit_rows(database: Database, action: str, target: str) -> list[dict[str, Any]]:
    with database.engine.connect() as connection:
        query = sa.select(audit_log).where(audit_log.c.action == action, audit_log.c.target == target)
        return [dict(row) for row in connection.execute(query).mappings()]


def unique(prefix: str) -> str:
    import secrets

    return f"{prefix}-{secrets.token_hex(4)}"


# --- authentication and the document --------------------------------------------------------------------------


def test_openapi_document_lists_every_route_and_each_is_served(admin_gateway: Gateway, org: httpx.Client) -> None:
    document = httpx.get(f"{admin_gateway.url}/admin/openapi.json").json()
    assert document["openapi"].startswith("3.") and "KeyCreate" in document["components"]["schemas"]
    operations = [(method, path) for path, item in document["paths"].items() for method in item]
    assert len(operations) > 25
    for method, path in operations:
        operation = document["paths"][path][method]
        assert operation["summary"] and operation["responses"] and operation["operationId"]
        concrete = (
            path.replace("{scope}", "team").replace("{team}", "t").replace("{user}", "u").replace("{deployment}", "d")
        )
        concrete = concrete.replace("{key}", "sk-gw-AAAAAAAAAAAA").replace("{subject}", "s")
        response = org.request(method.upper(), concrete, json={} if method in ("post", "put", "patch") else None)
        # Served: whatever the answer (400/404 for the dummy names), it is not the router's "no such URL/method".
        assert response.status_code != 405, (method, path)
        if response.status_code == 404:
            assert "Unknown request URL" not in response.text, (method, path)


def test_credentials_401_and_403(admin_gateway: Gateway, database: Database, lead: TeamAdmin) -> None:
    url = f"{admin_gateway.url}/admin/teams"
    assert_openai_error(httpx.get(url), 401)
    assert_openai_error(httpx.get(url, headers={"Authorization": "Bearer nope-nope"}), 401)
    assert_openai_error(httpx.get(url, headers={"Authorization": f"Bearer {ADMIN_KEY}x"}), 401)
    error = assert_openai_error(httpx.get(url, headers={"Authorization": f"Bearer {lead.member_key}"}), 403)
    assert error["code"] == "permission_denied"
    with client(admin_gateway, lead.key) as http:
        whoami = http.get("/admin/whoami").json()
        assert whoami["role"] == "team_admin" and whoami["team"] == lead.team
        assert whoami["actor"].startswith("team-admin:sk-gw-")


def test_admin_keys_from_the_cli_and_the_api(admin_gateway: Gateway, org: httpx.Client) -> None:
    created = json.loads(
        run_cli("admin-keys", "create", "--name", "ops", "--format", "json", config=admin_gateway.config_path).stdout
    )
    assert created["key"].startswith("sk-gwadm-")
    with client(admin_gateway, created["key"]) as http:
        assert http.get("/admin/whoami").json()["role"] == "org_admin"
        made = http.post("/admin/admin-keys", json={"name": "second"})
        assert made.status_code == 201 and made.json()["key"].startswith("sk-gwadm-")
    assert created["prefix"] in run_cli("admin-keys", "list", config=admin_gateway.config_path).stdout
    # An admin key is not an API key.
    assert_openai_error(chat(admin_gateway, created["key"]), 401)
    revoked = org.post(f"/admin/admin-keys/{created['prefix']}/revoke")
    assert revoked.json()["state"] == "revoked"
    assert_openai_error(org.post(f"/admin/admin-keys/{created['prefix']}/revoke"), 409)
    with client(admin_gateway, created["key"]) as http:
        assert_openai_error(http.get("/admin/whoami"), 401)
    with client(admin_gateway, made.json()["key"]) as http:
        assert http.get("/admin/admin-keys").status_code == 200


# --- teams and users --------------------------------------------------------------------------------------------


def test_teams_create_list_show_disable_with_audit(
    admin_gateway: Gateway, database: Database, org: httpx.Client
) -> None:
    name = unique("acme")
    created = org.post("/admin/teams", json={"name": name})
    assert created.status_code == 201 and created.json()["name"] == name
    assert_openai_error(org.post("/admin/teams", json={"name": name}), 409)
    assert_openai_error(org.post("/admin/teams", json={"name": ""}), 400)
    assert_openai_error(org.post("/admin/teams", json={"name": "x", "extra": 1}), 400)
    assert name in [team["name"] for team in org.get("/admin/teams").json()["data"]]
    assert org.get(f"/admin/teams/{name}").json()["active_keys"] == 0
    assert_openai_error(org.get("/admin/teams/no-such-team-here"), 404)

    key = org.post("/admin/keys", json={"team": name}).json()["key"]
    wait_key_known(admin_gateway, key)
    assert org.patch(f"/admin/teams/{name}", json={"disabled": True}).json()["disabled"] is True
    wait_for(lambda: chat(admin_gateway, key).status_code == 401, timeout=3, what="the disabled team's key refused")
    org.patch(f"/admin/teams/{name}", json={"disabled": False})
    wait_for(lambda: chat(admin_gateway, key).status_code == 200, timeout=3, what="the key to work again")

    [row] = audit_rows(database, "team.create", f"team:{name}")
    assert row["actor"] == "config-admin:1" and row["role"] == "org_admin" and row["after"]["name"] == name
    [disabled] = audit_rows(database, "team.disable", f"team:{name}")
    assert disabled["before"]["disabled"] is False and disabled["after"]["disabled"] is True
    assert audit_rows(database, "team.enable", f"team:{name}")


def test_users_create_list_show_disable(database: Database, org: httpx.Client) -> None:
    name = unique("alice")
    created = org.post("/admin/users", json={"name": name, "email": "alice@example.com"})
    assert created.status_code == 201
    assert_openai_error(org.post("/admin/users", json={"name": name}), 409)
    assert name in [user["name"] for user in org.get("/admin/users").json()["data"]]
    assert org.get(f"/admin/users/{name}").json()["email"] == "alice@example.com"
    assert org.patch(f"/admin/users/{name}", json={"disabled": True}).json()["disabled"] is True
    assert org.patch(f"/admin/users/{name}", json={"disabled": False}).json()["disabled"] is False
    assert_openai_error(org.get("/admin/users/nobody-at-all"), 404)
    assert len(audit_rows(database, "user.create", f"user:{name}")) == 1
    assert len(audit_rows(database, "user.disable", f"user:{name}")) == 1


# --- keys -------------------------------------------------------------------------------------------------------


def test_keys_create_once_list_prefix_only_revoke(
    admin_gateway: Gateway, database: Database, org: httpx.Client, lead: TeamAdmin
) -> None:
    created = org.post(
        "/admin/keys",
        json={
            "team": lead.team,
            "user": lead.user,
            "models": ["mock-small"],
            "expires_in": "30d",
            "name": "ci",
            "tags": ["batch"],
        },
    )
    assert created.status_code == 201
    body = created.json()
    secret, prefix = body["key"], body["prefix"]
    assert secret.startswith(prefix + "-") and body["models"] == ["mock-small"] and body["tags"] == ["batch"]
    wait_key_known(admin_gateway, secret)
    assert chat(admin_gateway, secret).status_code == 200

    listing = org.get("/admin/keys", params={"team": lead.team})
    assert secret not in listing.text and secret.split("-")[-1] not in listing.text
    assert prefix in [key["prefix"] for key in listing.json()["data"]]
    assert all("key" not in key for key in listing.json()["data"])
    assert org.get(f"/admin/keys/{prefix}").json()["state"] == "active"
    assert_openai_error(org.post("/admin/keys", json={"team": "no-such-team-x"}), 404)
    assert_openai_error(org.post("/admin/keys", json={"team": lead.team, "expires_in": "soon"}), 400)

    revoked = org.post(f"/admin/keys/{prefix}/revoke")
    assert revoked.json()["state"] == "revoked"
    wait_for(lambda: chat(admin_gateway, secret).status_code == 401, timeout=1.5, what="the revoked key refused")
    assert_openai_error(org.post(f"/admin/keys/{prefix}/revoke"), 409)
    [row] = audit_rows(database, "key.revoke", f"key:{prefix}")
    assert row["before"]["state"] == "active" and row["after"]["state"] == "revoked"
    assert secret not in json.dumps(audit_rows(database, "key.create", f"key:{prefix}"), default=str)


def test_rotate_issues_a_new_key_and_expires_the_old_after_the_overlap(
    admin_gateway: Gateway, database: Database, org: httpx.Client, lead: TeamAdmin
) -> None:
    org.put(f"/admin/limits/key/{lead.member_prefix}", json={"rpm": 1000}).raise_for_status()
    asked = datetime.now(UTC)
    rotated = org.post(f"/admin/keys/{lead.member_prefix}/rotate", json={"overlap": "2s"})
    answered = datetime.now(UTC)
    assert rotated.status_code == 201, rotated.text
    new, old = rotated.json()["new"], rotated.json()["old"]
    assert new["team"] == lead.team and new["user"] == lead.user and new["tags"] == ["research"]
    expires = datetime.fromisoformat(old["expires_at"].replace("Z", "+00:00"))
    # Two seconds after the rotation, whenever the server made it (a busy machine may take a while to answer).
    overlap = timedelta(seconds=2)
    assert asked + overlap - timedelta(seconds=1) <= expires <= answered + overlap + timedelta(seconds=1)
    wait_key_known(admin_gateway, new["key"])
    assert chat(admin_gateway, new["key"]).status_code == 200
    # The old key keeps working during the overlap, then stops.
    wait_for(lambda: chat(admin_gateway, lead.member_key).status_code == 401, timeout=5, what="the old key to expire")
    assert chat(admin_gateway, new["key"]).status_code == 200
    limits = {row["subject"]: row for row in org.get("/admin/limits", params={"team": lead.team}).json()["data"]}
    assert limits[new["prefix"]]["rpm"] == 1000  # the key's limits moved with it
    [row] = audit_rows(database, "key.rotate", f"key:{lead.member_prefix}")
    assert row["after"]["replaced_by"] == new["prefix"]
    assert_openai_error(org.post(f"/admin/keys/{lead.member_prefix}/rotate", json={}), 409)


def test_team_admin_flag_from_the_cli(admin_gateway: Gateway, lead: TeamAdmin) -> None:
    created = json.loads(
        run_cli(
            "keys", "create", "--team", lead.team, "--team-admin", "--format", "json", config=admin_gateway.config_path
        ).stdout
    )
    with client(admin_gateway, created["key"]) as http:
        assert http.get("/admin/whoami").json()["team"] == lead.team


# --- limits, budgets, prices ------------------------------------------------------------------------------------


def test_limits_set_list_clear_and_budgets(
    admin_gateway: Gateway, database: Database, org: httpx.Client, lead: TeamAdmin
) -> None:
    put = org.put(
        f"/admin/limits/team/{lead.team}",
        json={"daily_tokens": 100000, "monthly_cost_usd": "12.5", "rpm": "unlimited", "budget_mode": "soft"},
    )
    assert put.status_code == 200, put.text
    assert put.json()["monthly_cost_nanousd"] == 12_500_000_000 and put.json()["rpm"] == "unlimited"
    assert_openai_error(org.put(f"/admin/limits/team/{lead.team}", json={}), 400)
    assert_openai_error(org.put(f"/admin/limits/team/{lead.team}", json={"rpm": -5}), 400)
    assert_openai_error(org.put("/admin/limits/galaxy/x", json={"rpm": 1}), 404)
    team_model = org.put(f"/admin/limits/team_model/{lead.team}", json={"model": "mock-small", "tpm": 500})
    assert team_model.status_code == 200 and team_model.json()["model"] == "mock-small"
    assert org.put("/admin/limits/model/mock-large", json={"concurrency": 50}).status_code == 200

    budgets = org.get("/admin/budgets", params={"team": lead.team}).json()["data"]
    team_budgets = {row["metric"]: row for row in budgets if row["scope"] == "team"}
    assert team_budgets["daily_tokens"]["limit"] == 100000 and team_budgets["daily_tokens"]["mode"] == "soft"
    assert team_budgets["monthly_cost"]["limit"] == 12_500_000_000

    listed = org.get("/admin/limits", params={"team": lead.team}).json()["data"]
    assert {(row["scope"], row["model"]) for row in listed} >= {("team", None), ("team_model", "mock-small")}
    assert org.delete(f"/admin/limits/team_model/{lead.team}", params={"model": "mock-small"}).status_code == 200
    assert_openai_error(org.delete(f"/admin/limits/team_model/{lead.team}", params={"model": "mock-small"}), 404)
    org.delete("/admin/limits/model/mock-large").raise_for_status()
    org.delete(f"/admin/limits/team/{lead.team}").raise_for_status()
    [row] = audit_rows(database, "limits.set", f"team:{lead.team}")
    assert row["before"] is None and row["after"]["daily_tokens"] == 100000
    assert audit_rows(database, "limits.clear", f"team:{lead.team}")[0]["after"] is None


def test_prices_are_effective_dated_and_apply_to_new_requests(
    admin_gateway: Gateway, database: Database, org: httpx.Client, lead: TeamAdmin
) -> None:
    # "renamed" has no configured price: nothing else in the suite expects a cost for it.
    before = org.get("/admin/prices", params={"model": "renamed"}).json()["data"]
    assert_openai_error(
        org.post(
            "/admin/prices",
            json={"model": "renamed", "prompt": 1, "completion": 1, "effective_from": "2020-01-01T00:00:00Z"},
        ),
        400,
    )
    future = (datetime.now(UTC) + timedelta(days=30)).isoformat()
    scheduled = org.post(
        "/admin/prices", json={"model": "renamed", "prompt": 9, "completion": 9, "effective_from": future}
    )
    assert scheduled.status_code == 201 and scheduled.json()["scheduled"] is True
    created = org.post("/admin/prices", json={"model": "renamed", "prompt": "3.5", "completion": "14"})
    assert created.status_code == 201 and created.json()["current"] is True
    rows = org.get("/admin/prices", params={"model": "renamed"}).json()["data"]
    assert [row["id"] for row in rows if row["current"]] == [created.json()["id"]]
    assert {row["id"] for row in before} <= {row["id"] for row in rows}  # history kept
    assert audit_rows(database, "price.create", "price:renamed")

    # The next request is priced with it: (prompt * 3.5 + completion * 14) / 1M USD.
    wait_key_known(admin_gateway, lead.member_key)
    with database.engine.connect() as connection:
        version = read_version(connection)
    wait_for(
        lambda: httpx.get(f"{admin_gateway.url}/ready").json()["snapshot_version"] >= version,
        timeout=5,
        what="the gateway to load the new price",
    )
    response = wait_for(
        lambda: (r := chat(admin_gateway, lead.member_key, model="renamed")).status_code == 200 and r, timeout=5
    )
    request_id = response.headers["x-gateway-request-id"]
    [row] = wait_for(
        lambda: [row for row in database.usage_rows() if str(row["request_id"]) == request_id],
        timeout=10,
        what="the ledger row",
    )
    assert row["price_id"] == created.json()["id"]
    assert row["cost_nanousd"] == round(row["prompt_tokens"] * 3500 + row["completion_tokens"] * 14000)
