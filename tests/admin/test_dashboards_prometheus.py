"""The shipped observability files are checked for real: the alert rules pass `promtool check rules` and load in a
Prometheus; a Prometheus (Debian's package) scrapes a test gateway after known traffic and every PromQL expression
of the Grafana dashboards parses and returns data; the billing dashboard's SQL runs against the test ledger, and
its totals equal the ledger's."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
import yaml

from gateway.limits.overrides import set_override
from tests.admin.conftest import make_team_admin
from tests.harness import (
    ROOT,
    Database,
    Gateway,
    MockBackend,
    RedisServer,
    closed_port,
    create_database,
    gateway_config,
    start_gateway,
    wait_for,
)

DEPLOY = ROOT / "deploy"
RULES = DEPLOY / "prometheus" / "rules" / "gateway.yml"
DASHBOARDS = DEPLOY / "grafana" / "dashboards"
# What Grafana would put for its variables: every model and team, the usual rate window.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "15s", "$model": ".*", "$team": ".*"}


def targets(dashboard: str, datasource: str) -> list[tuple[str, str]]:
    document = json.loads((DASHBOARDS / dashboard).read_text())
    found = []
    for panel in document["panels"]:
        for target in panel["targets"]:
            if target["datasource"]["uid"] == datasource:
                found.append((panel["title"], target.get("expr") or target["rawSql"]))
    return found


def promql(expression: str) -> str:
    for variable, value in GRAFANA_VARIABLES.items():
        expression = expression.replace(variable, value)
    return expression


def test_promtool_checks_the_alert_rules() -> None:
    if shutil.which("promtool") is None:
        pytest.skip("promtool is not installed (scripts/test installs Debian's prometheus)")
    result = subprocess.run(["promtool", "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_grafana_provisioning_points_at_the_dashboards() -> None:
    datasources = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/datasources.yaml").read_text())
    uids = {source["uid"]: source["type"] for source in datasources["datasources"]}
    assert uids == {"prometheus": "prometheus", "ledger": "postgres"}
    for name in ("operations.json", "billing.json"):
        document = json.loads((DASHBOARDS / name).read_text())
        for panel in document["panels"]:
            assert panel["datasource"]["uid"] in uids, (name, panel["title"])
    assert targets("operations.json", "prometheus") and targets("billing.json", "ledger")


@pytest.fixture
def observed(mock_backend: MockBackend, tmp_path: Path) -> Iterator[tuple[Gateway, Database]]:
    """A gateway on PostgreSQL and a Redis of its own, after traffic of every kind the dashboards show."""
    database = create_database("postgresql", tmp_path)
    redis = RedisServer(tmp_path)
    redis.start()
    gateway = start_gateway(tmp_path, gateway_config(database.url, mock_backend.url, **{"redis.url": redis.url}))
    try:
        yield gateway, database
    finally:
        gateway.stop()
        redis.stop()
        database.drop()


def requests_total(gateway: Gateway) -> float:
    """`sum(gateway_requests_total)` as the gateway itself exports it."""
    text = httpx.get(f"{gateway.url}/metrics").text
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("gateway_requests_total{")
    )


def send_traffic(gateway: Gateway, database: Database) -> None:
    """Plain and streamed calls, an upstream failure, and a rate-limit refusal."""
    tenant = make_team_admin(database)
    limited = make_team_admin(database)
    set_override(database.engine, "team", limited.team, {"rpm": 1})
    headers = {"Authorization": f"Bearer {tenant.member_key}"}
    wait_for(lambda: httpx.get(f"{gateway.base_url}/models", headers=headers).is_success, timeout=5, what="keys")
    for index in range(4):
        body = {
            "model": ("mock-small", "mock-large")[index % 2],
            "messages": [{"role": "user", "content": "hi " * 5}],
            "max_tokens": 6,
            "stream": index % 2 == 1,
        }
        assert httpx.post(f"{gateway.base_url}/chat/completions", headers=headers, json=body).is_success
    dead = httpx.post(
        f"{gateway.base_url}/chat/completions",
        headers=headers,
        json={"model": "mock-dead", "messages": [{"role": "user", "content": "x"}]},
    )
    assert dead.status_code == 502
    limited_headers = {"Authorization": f"Bearer {limited.member_key}"}
    statuses = {
        httpx.post(
            f"{gateway.base_url}/chat/completions",
            headers=limited_headers,
            json={"model": "mock-small", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2},
        ).status_code
        for _ in range(3)
    }
    assert 429 in statuses


class Prometheus:
    def __init__(self, tmp: Path, gateway: Gateway) -> None:
        self.port = closed_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(RULES)],
            "scrape_configs": [
                {"job_name": "gateway", "static_configs": [{"targets": [gateway.url.removeprefix("http://")]}]}
            ],
        }
        path = tmp / "prometheus.yml"
        path.write_text(yaml.safe_dump(config))
        self.log = open(tmp / "prometheus.log", "wb")  # noqa: SIM115 - closed in stop()
        self.popen = subprocess.Popen(
            [
                "prometheus",
                f"--config.file={path}",
                f"--storage.tsdb.path={tmp / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=self.log,
            stderr=self.log,
        )
        wait_for(self.ready, timeout=30, what="prometheus to start")

    def ready(self) -> bool:
        try:
            return httpx.get(f"{self.url}/-/ready", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def query(self, expression: str) -> dict[str, Any]:
        return httpx.get(f"{self.url}/api/v1/query", params={"query": expression}, timeout=10).json()

    def value(self, expression: str) -> float | None:
        result = self.query(expression)["data"]["result"]
        return float(result[0]["value"][1]) if result else None

    def stop(self) -> None:
        self.popen.terminate()
        self.popen.wait(20)
        self.log.close()


def test_every_dashboard_query_returns_data(observed: tuple[Gateway, Database], tmp_path: Path) -> None:
    if shutil.which("prometheus") is None:
        pytest.skip("prometheus is not installed (scripts/test installs Debian's package)")
    gateway, database = observed
    prometheus = Prometheus(tmp_path, gateway)
    try:
        send_traffic(gateway, database)
        first = requests_total(gateway)
        wait_for(
            lambda: prometheus.value("sum(gateway_requests_total)") == first,
            timeout=20,
            what="prometheus to scrape the first traffic",
        )
        send_traffic(gateway, database)  # a second round, so that rate() sees an increase
        second = requests_total(gateway)
        assert second > first
        wait_for(
            lambda: prometheus.value("sum(gateway_requests_total)") == second,
            timeout=20,
            what="prometheus to scrape the second traffic",
        )

        problems = []
        for title, expression in targets("operations.json", "prometheus"):
            answer = prometheus.query(promql(expression))
            if answer.get("status") != "success":
                problems.append(f"{title}: {answer.get('error')}")
            elif not answer["data"]["result"]:
                problems.append(f"{title}: no data for {promql(expression)}")
        assert not problems, "\n".join(problems)

        rules = httpx.get(f"{prometheus.url}/api/v1/rules").json()["data"]["groups"]
        loaded = [rule for group in rules for rule in group["rules"]]
        assert len(loaded) == len(re.findall(r"- alert:", RULES.read_text()))
        wait_for(
            lambda: all(
                rule.get("health") == "ok"
                for group in httpx.get(f"{prometheus.url}/api/v1/rules").json()["data"]["groups"]
                for rule in group["rules"]
            ),
            timeout=10,
            what="every alert rule to evaluate",
        )
    finally:
        prometheus.stop()

    # The billing dashboard's SQL, with Grafana's time macro, against the test ledger.
    start, end = datetime.now(UTC) - timedelta(days=30), datetime.now(UTC) + timedelta(days=1)
    with database.engine.connect() as connection:
        ledger_cost, ledger_requests = connection.execute(
            sa.text("SELECT COALESCE(SUM(cost_nanousd), 0), COUNT(*) FROM usage")
        ).one()
        for title, sql in targets("billing.json", "ledger"):
            sql = re.sub(
                r"\$__timeFilter\(([\w.]+)\)", rf"\1 BETWEEN '{start.isoformat()}' AND '{end.isoformat()}'", sql
            )
            rows = connection.execute(sa.text(sql)).mappings().all()
            assert rows, title
            if title == "Spend (USD) in range":
                assert round(float(rows[0]["spend_usd"]) * 1e9) == ledger_cost
            if title == "Requests in range":
                assert rows[0]["requests"] == ledger_requests
    # Every admitted request is in the ledger once; the requests total also counts refusals at admission (429).
    refused = sum(
        float(line.rsplit(" ", 1)[1])
        for line in httpx.get(f"{gateway.url}/metrics").text.splitlines()
        if line.startswith("gateway_rate_limited_total{")
    )
    assert refused > 0
    assert ledger_requests == second - refused
