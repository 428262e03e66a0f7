"""Team admins manage their own team and nothing else: every attempt at another team, or at an organisation-level
change, is a 403 in OpenAI's shape that carries none of the other team's data, and changes nothing."""

from __future__ import annotations

import httpx
import pytest
import sqlalchemy as sa

from gateway.db.schema import audit_log
from tests.admin.conftest import TeamAdmin, client
from tests.conftest import wait_key_known
from tests.harness import Database, Gateway, wait_for


def forbidden(response: httpx.Response, *secrets_of_other_team: str) -> None:
    assert response.status_code == 403, (response.request.method, response.request.url, response.text)
    body = response.json()
    assert body["error"]["code"] == "permission_denied" and body["error"]["type"] == "invalid_request_error"
    for secret in secrets_of_other_team:
        assert secret not in response.text


def test_team_admin_sees_and_changes_its_own_team(
    admin_gateway: Gateway, database: Database, lead: TeamAdmin, other: TeamAdmin
) -> None:
    with client(admin_gateway, lead.key) as http:
        assert [team["name"] for team in http.get("/admin/teams").json()["data"]] == [lead.team]
        assert http.get(f"/admin/teams/{lead.team}").json()["name"] == lead.team
        assert [user["name"] for user in http.get("/admin/users").json()["data"]] == [lead.user]
        keys = http.get("/admin/keys").json()["data"]
        assert {key["team"] for key in keys} == {lead.team} and len(keys) == 2

        created = http.post("/admin/keys", json={"user": lead.user, "name": "from-lead"})
        assert created.status_code == 201 and created.json()["team"] == lead.team
        new_key, new_prefix = created.json()["key"], created.json()["prefix"]
        wait_key_known(admin_gateway, new_key)
        limited = http.put(f"/admin/limits/key/{new_prefix}", json={"rpm": 30, "daily_tokens": 5000})
        assert limited.status_code == 200, limited.text
        assert {row["subject"] for row in http.get("/admin/limits").json()["data"]} == {new_prefix}
        assert http.get("/admin/budgets").json()["data"][0]["subject"] == new_prefix
        assert http.post(f"/admin/keys/{new_prefix}/rotate", json={"overlap": "1h"}).status_code == 201
        assert http.post(f"/admin/keys/{new_prefix}/revoke").json()["state"] == "revoked"
        wait_for(
            lambda: (
                httpx.get(
                    f"{admin_gateway.base_url}/models", headers={"Authorization": f"Bearer {new_key}"}
                ).status_code
                == 401
            ),
            timeout=2,
            what="the key revoked by the team admin refused",
        )
        assert http.get("/admin/usage", params={"group_by": "key"}).status_code == 200
        audit = http.get("/admin/audit").json()["data"]
        assert {row["action"] for row in audit} >= {"key.create", "limits.set", "key.rotate", "key.revoke"}
        assert all(row["team_id"] == audit[0]["team_id"] for row in audit)
        assert all(row["actor"].startswith("team-admin:") for row in audit)


def test_team_admin_gets_403_for_another_team_and_changes_nothing(
    admin_gateway: Gateway, database: Database, lead: TeamAdmin, other: TeamAdmin
) -> None:
    with database.engine.connect() as connection:
        audit_before = connection.execute(sa.select(sa.func.count()).select_from(audit_log)).scalar()
    other_secret = other.member_key
    # Known to the gateway before the attempts, so that "still works" below means something (the attempts alone
    # can take less than one key-cache poll).
    wait_key_known(admin_gateway, other_secret)
    with client(admin_gateway, lead.key) as http:
        # Reading another team, by every route that takes one.
        forbidden(http.get(f"/admin/teams/{other.team}"), other.team)
        forbidden(http.get("/admin/teams/no-such-team"))  # existence is not revealed either
        forbidden(http.get("/admin/keys", params={"team": other.team}), other.member_prefix)
        forbidden(http.get(f"/admin/keys/{other.member_prefix}"), other.member_prefix)
        forbidden(http.get(f"/admin/users/{other.user}"), other.user)
        forbidden(http.get("/admin/limits", params={"team": other.team}))
        forbidden(http.get("/admin/budgets", params={"team": other.team}))
        forbidden(http.get("/admin/usage", params={"team": other.team, "group_by": "key"}), other.member_prefix)
        forbidden(http.get("/admin/usage", params={"key": other.member_prefix}))
        forbidden(http.get("/admin/audit", params={"team": other.team}))
        forbidden(http.get("/admin/alerts", params={"team": other.team}))
        # Changing another team.
        forbidden(http.post("/admin/keys", json={"team": other.team}), other_secret)
        forbidden(http.post(f"/admin/keys/{other.member_prefix}/revoke"))
        forbidden(http.post(f"/admin/keys/{other.member_prefix}/rotate", json={}))
        forbidden(http.put(f"/admin/limits/key/{other.member_prefix}", json={"rpm": 1}))
        forbidden(http.delete(f"/admin/limits/key/{other.member_prefix}"))
        forbidden(http.post("/admin/keys", json={"user": other.user}))  # a user outside the team
        # Organisation-level changes, even for its own team.
        forbidden(http.post("/admin/teams", json={"name": "sneaky"}))
        forbidden(http.patch(f"/admin/teams/{lead.team}", json={"disabled": True}))
        forbidden(http.post("/admin/users", json={"name": "sneaky"}))
        forbidden(http.patch(f"/admin/users/{lead.user}", json={"disabled": True}))
        forbidden(http.put(f"/admin/limits/team/{lead.team}", json={"daily_tokens": 10**9}))
        forbidden(http.put(f"/admin/limits/user/{lead.user}", json={"rpm": 1}))
        forbidden(http.put("/admin/limits/model/mock-small", json={"rpm": 1}))
        forbidden(http.post("/admin/keys", json={"team_admin": True}))
        forbidden(http.post("/admin/prices", json={"model": "mock-small", "prompt": 0, "completion": 0}))
        forbidden(http.get("/admin/admin-keys"))
        forbidden(http.post("/admin/admin-keys", json={}))
    # The other team's key still works, and nothing was written.
    assert httpx.get(f"{admin_gateway.base_url}/models", headers={"Authorization": f"Bearer {other_secret}"}).is_success
    with database.engine.connect() as connection:
        assert connection.execute(sa.select(sa.func.count()).select_from(audit_log)).scalar() == audit_before


@pytest.mark.parametrize("role", ["member", "revoked_admin"])
def test_keys_without_the_admin_role_cannot_use_the_admin_api(
    admin_gateway: Gateway, lead: TeamAdmin, role: str, org: httpx.Client
) -> None:
    key = lead.member_key
    if role == "revoked_admin":
        key = lead.key
        org.post(f"/admin/keys/{key[:18]}/revoke").raise_for_status()
    with client(admin_gateway, key) as http:
        response = http.get("/admin/teams")
    assert response.status_code == (403 if role == "member" else 401)
