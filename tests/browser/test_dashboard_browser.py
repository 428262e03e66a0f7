"""End to end in headless Chromium (Debian's package, driven by Playwright; nothing downloads a browser): sign in,
send traffic, see the chart and totals match the ledger, revoke a key in the UI and see the next request with it
refused. Screenshots are kept under .artifacts/."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.admin.conftest import ADMIN_KEY, make_team_admin
from tests.harness import ROOT, Database, MockBackend, create_database, gateway_config, start_gateway, wait_for

pytestmark = pytest.mark.browser
CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = ROOT / ".artifacts"


@pytest.fixture
def browser() -> Iterator[object]:
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian's chromium is not installed (scripts/test installs it with apt)")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"]
        )
        yield chromium
        chromium.close()


@pytest.fixture
def sqlite_db(tmp_path: Path) -> Iterator[Database]:
    database = create_database("sqlite", tmp_path)
    yield database
    database.drop()


def _chat(base_url: str, key: str, model: str, words: int) -> httpx.Response:
    return httpx.post(
        f"{base_url}/chat/completions",
        headers={"Authorization": f"Bearer {key}"},
        json={"model": model, "messages": [{"role": "user", "content": "word " * words}], "max_tokens": 8 + words},
    )


def test_sign_in_see_usage_match_the_ledger_and_revoke_a_key(
    browser: object, sqlite_db: Database, mock_backend: MockBackend, tmp_path: Path
) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    config = gateway_config(sqlite_db.url, mock_backend.url, **{"admin.keys": [ADMIN_KEY]})
    gateway = start_gateway(tmp_path, config)
    try:
        first, second = make_team_admin(sqlite_db), make_team_admin(sqlite_db)
        for tenant in (first, second):
            wait_for(
                lambda t=tenant: _chat(gateway.base_url, t.member_key, "mock-small", 1).status_code == 200,
                timeout=5,
                what="the new keys",
            )
        for index in range(8):
            tenant = (first, second)[index % 2]
            assert _chat(gateway.base_url, tenant.member_key, ("mock-small", "mock-large")[index % 2], index).is_success
        ledger = wait_for(
            lambda: (rows := sqlite_db.usage_rows()) and len(rows) == 10 and rows, timeout=15, what="ten ledger rows"
        )
        ledger_cost = sum(row["cost_nanousd"] for row in ledger)
        ledger_tokens = sum(row["prompt_tokens"] + row["completion_tokens"] for row in ledger)

        page = browser.new_page(viewport={"width": 1400, "height": 1000})  # type: ignore[attr-defined]
        page.goto(f"{gateway.url}/dashboard")
        assert page.url.endswith("/dashboard/login")
        page.fill("input[name=key]", "sk-gw-not-a-real-key")
        page.click("button[type=submit]")
        assert "not valid" in page.content()
        page.fill("input[name=key]", ADMIN_KEY)
        page.click("button[type=submit]")
        page.wait_for_selector("#spend-chart")
        cookie = next(c for c in page.context.cookies() if c["name"] == "gw_session")
        assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and ADMIN_KEY not in cookie["value"]

        # The totals and the chart are the ledger's numbers, exactly.
        assert int(page.get_attribute("#total-cost", "data-nanousd")) == ledger_cost
        assert int(page.get_attribute("#total-tokens", "data-tokens")) == ledger_tokens
        assert int(page.get_attribute("#total-requests", "data-requests")) == len(ledger)
        bars = page.query_selector_all("#spend-chart rect.bar")
        assert {bar.get_attribute("data-series") for bar in bars} == {first.team, second.team}
        assert sum(float(bar.get_attribute("data-value")) for bar in bars) == ledger_cost
        for tenant in (first, second):
            team_cost = sum(row["cost_nanousd"] for row in ledger if row["key_id"] in tenant.member_prefix)
            assert tenant.team in page.inner_text("#top-consumers")
            assert team_cost > 0
        page.screenshot(path=str(ARTIFACTS / "dashboard-usage.png"), full_page=True)

        # Revoke the first team's key in the UI; the next request with it is refused.
        page.click("a[href='/dashboard/keys']")
        page.wait_for_selector("#keys")
        page.click(f"button[data-prefix='{first.member_prefix}']")
        page.wait_for_selector(f"tr:has-text('{first.member_prefix}') .pill.revoked")
        wait_for(
            lambda: _chat(gateway.base_url, first.member_key, "mock-small", 1).status_code == 401,
            timeout=1.5,
            what="the key revoked in the UI to be refused",
        )
        assert _chat(gateway.base_url, second.member_key, "mock-small", 1).status_code == 200
        page.screenshot(path=str(ARTIFACTS / "dashboard-keys.png"), full_page=True)

        # A form without the session's CSRF token is refused, and changes nothing.
        response = page.request.post(
            f"{gateway.url}/dashboard/keys/{second.member_prefix}/revoke", form={"csrf": "forged"}
        )
        assert response.status == 403
        assert _chat(gateway.base_url, second.member_key, "mock-small", 1).status_code == 200

        # A team admin signs in too, and sees only its team.
        team_page = browser.new_page()  # type: ignore[attr-defined]
        team_page.goto(f"{gateway.url}/dashboard/login")
        team_page.fill("input[name=key]", second.key)
        team_page.click("button[type=submit]")
        team_page.wait_for_selector("#spend-chart")
        assert first.team not in team_page.content() and first.member_prefix not in team_page.content()
        team_page.goto(f"{gateway.url}/dashboard/keys?team={first.team}")
        assert "Team admins may only see" in team_page.content()
        team_page.goto(f"{gateway.url}/dashboard/budgets")
        team_page.screenshot(path=str(ARTIFACTS / "dashboard-team-admin.png"), full_page=True)
    finally:
        assert gateway.stop() == 0
        shutil.copy(gateway.process.log_path, ARTIFACTS / "dashboard-gateway.log")
        assert "Traceback" not in gateway.log(), gateway.log()[-3000:]
