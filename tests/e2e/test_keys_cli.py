"""The CLI (keys, teams, users, db, --help) and revocation across gateway processes."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest

from tests.harness import (
    Database,
    Gateway,
    MockBackend,
    gateway_config,
    run_cli,
    start_gateway,
    wait_for,
    write_config,
)

CHAT = {"model": "mock-small", "messages": [{"role": "user", "content": "hi"}]}


def chat_status(gateway: Gateway, key: str) -> int:
    return httpx.post(
        f"{gateway.base_url}/chat/completions", headers={"Authorization": f"Bearer {key}"}, json=CHAT
    ).status_code


def test_revocation_reaches_a_second_gateway_process_within_a_second(
    gateway: Gateway, database: Database, mock_backend: MockBackend, tmp_path: Path
) -> None:
    second = start_gateway(tmp_path, gateway_config(database.url, mock_backend.url))
    try:
        run_cli("teams", "create", "revokers", config=gateway.config_path)
        created = json.loads(
            run_cli("keys", "create", "--team", "revokers", "--format", "json", config=gateway.config_path).stdout
        )
        key = created["key"]
        for gw in (gateway, second):
            wait_for(lambda gw=gw: chat_status(gw, key) == 200, timeout=2, what="the new key")

        run_cli("keys", "revoke", created["prefix"], config=gateway.config_path)
        revoked_at = time.monotonic()
        wait_for(lambda: chat_status(second, key) == 401, timeout=3, what="the second process to refuse the key")
        elapsed = time.monotonic() - revoked_at
        assert elapsed < 1.0, f"revocation took {elapsed:.2f}s to reach the second process"
        assert chat_status(gateway, key) == 401
        body = httpx.get(f"{second.base_url}/models", headers={"Authorization": f"Bearer {key}"}).json()
        assert "revoked" in body["error"]["message"]
    finally:
        assert second.stop() == 0


def test_keys_create_list_revoke(gateway: Gateway) -> None:
    run_cli("teams", "create", "cli-team", config=gateway.config_path)
    run_cli("users", "create", "cli-user", "--email", "u@example.com", config=gateway.config_path)
    created = run_cli(
        "keys",
        "create",
        "--team",
        "cli-team",
        "--user",
        "cli-user",
        "--models",
        "mock-small,mock-embed",
        "--expires",
        "30d",
        "--name",
        "ci",
        config=gateway.config_path,
    )
    secret = created.stdout.strip()
    assert secret.startswith("sk-gw-") and len(secret) == 51
    assert "shown only this once" in created.stderr

    listing = json.loads(
        run_cli("keys", "list", "--team", "cli-team", "--format", "json", config=gateway.config_path).stdout
    )
    assert len(listing) == 1
    entry = listing[0]
    assert secret.startswith(entry["prefix"]) and secret not in json.dumps(listing)
    assert (
        entry["state"] == "active" and entry["user"] == "cli-user" and entry["models"] == ["mock-embed", "mock-small"]
    )
    assert entry["expires_at"] is not None

    wait_for(lambda: chat_status(gateway, secret) == 200, timeout=2, what="the new key")
    wait_for(
        lambda: (
            json.loads(
                run_cli("keys", "list", "--team", "cli-team", "--format", "json", config=gateway.config_path).stdout
            )[0]["last_used_at"]
            is not None
        ),
        timeout=5,
        what="last_used_at to be recorded",
    )

    table = run_cli("keys", "list", config=gateway.config_path).stdout
    assert "PREFIX" in table and entry["prefix"] in table and secret not in table

    run_cli("keys", "revoke", entry["prefix"], config=gateway.config_path)
    listing = json.loads(
        run_cli("keys", "list", "--team", "cli-team", "--format", "json", config=gateway.config_path).stdout
    )
    assert listing[0]["state"] == "revoked"
    again = run_cli("keys", "revoke", entry["prefix"], config=gateway.config_path, check=False)
    assert again.returncode == 1 and "already revoked" in again.stderr


def test_cli_refuses_unknown_team_clearly(gateway: Gateway) -> None:
    result = run_cli("keys", "create", "--team", "nope", config=gateway.config_path, check=False)
    assert result.returncode == 1
    assert "team 'nope' does not exist" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "command",
    [
        [],
        ["serve"],
        ["demo"],
        ["db"],
        ["db", "upgrade"],
        ["teams"],
        ["teams", "create"],
        ["users"],
        ["keys"],
        ["keys", "create"],
        ["keys", "list"],
        ["keys", "revoke"],
    ],
)
def test_help_everywhere(command: list[str]) -> None:
    result = run_cli(*command, "--help")
    assert result.stdout.startswith("usage: gateway")


def test_bad_config_names_the_field(tmp_path: Path) -> None:
    config = gateway_config("sqlite:///unused.db", "http://127.0.0.1:1")
    config["models"]["mock-small"]["deployments"][0]["base_url"] = "ftp://nope"
    config["server"]["max_body_bytes"] = "lots"
    path = write_config(tmp_path, config)
    result = run_cli("serve", config=path, check=False)
    assert result.returncode == 2
    assert "models.mock-small.deployments.0.base_url" in result.stderr
    assert "server.max_body_bytes" in result.stderr
    assert "Traceback" not in result.stderr

    path.write_text("models: [unclosed")
    result = run_cli("serve", config=path, check=False)
    assert result.returncode == 2 and "not valid YAML" in result.stderr

    path.write_text("auth: {pepper: ${UNSET_VARIABLE_FOR_TEST}}\nmodels: {}\n")
    result = run_cli("serve", config=path, check=False)
    assert result.returncode == 2 and "UNSET_VARIABLE_FOR_TEST" in result.stderr


def test_serve_refuses_an_unmigrated_database(tmp_path: Path, mock_backend: MockBackend) -> None:
    path = write_config(tmp_path, gateway_config(f"sqlite:///{tmp_path / 'empty.db'}", mock_backend.url))
    result = run_cli("serve", config=path, check=False)
    assert result.returncode == 2 and "gateway db upgrade" in result.stderr
    run_cli("db", "upgrade", config=path)
    current, head = run_cli("db", "current", config=path).stdout.split()[1::2]
    assert current == head != "None"


def test_several_workers_without_redis_are_refused_when_limits_apply(
    tmp_path: Path, database: Database, mock_backend: MockBackend
) -> None:
    config = gateway_config(database.url, mock_backend.url, **{"limits.team": {"tpm": 1000}, "listen.port": 18099})
    result = run_cli("serve", "--workers", "2", config=write_config(tmp_path, config), check=False)
    assert result.returncode == 2 and "needs Redis" in result.stderr


def test_usage_report_cli_matches_the_ledger(gateway: Gateway, database: Database) -> None:
    from tests.conftest import wait_key_known
    from tests.harness import make_tenant

    tenant = make_tenant(database.engine)
    wait_key_known(gateway, tenant.key)
    for model in ("mock-small", "mock-large", "mock-large"):
        assert (
            httpx.post(
                f"{gateway.base_url}/chat/completions",
                headers={"Authorization": f"Bearer {tenant.key}"},
                json={"model": model, "messages": CHAT["messages"], "max_tokens": 4},
            ).status_code
            == 200
        )
    rows = wait_for(
        lambda: (
            len([r for r in database.usage_rows() if r["key_id"] == tenant.key_id]) == 3
            and [r for r in database.usage_rows() if r["key_id"] == tenant.key_id]
        ),
        what="usage rows",
    )
    report = json.loads(
        run_cli(
            "usage",
            "report",
            "--team",
            tenant.team,
            "--group-by",
            "model",
            "--format",
            "json",
            config=gateway.config_path,
        ).stdout
    )
    expected = {
        model: sum(r["cost_nanousd"] for r in rows if r["model"] == model) for model in ("mock-small", "mock-large")
    }
    assert {line["group"]: line["cost_nanousd"] for line in report} == expected
    assert {line["group"]: line["requests"] for line in report} == {"mock-small": 1, "mock-large": 2}
    csv_text = run_cli(
        "usage", "report", "--team", tenant.team, "--group-by", "user", "--format", "csv", config=gateway.config_path
    ).stdout
    assert csv_text.splitlines()[0].startswith("group,requests,") and tenant.user in csv_text
