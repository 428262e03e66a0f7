"""Budget threshold alerts: crossing 50 % and then 100 % of a team's budget sends one signed webhook per threshold
and period, even with two gateway processes evaluating, retried after a failed delivery; the thresholds skipped
over are recorded as superseded, and the alerts are listed for the dashboard."""

from __future__ import annotations

import copy
import math
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from gateway.alerts import verify
from gateway.limits.overrides import set_override
from tests.admin.conftest import ADMIN_KEY, client, make_team_admin
from tests.harness import Database, Gateway, MockBackend, gateway_config, start_gateway, wait_for

SECRET = "webhook-secret-for-tests"


class Receiver:
    """A webhook endpoint on 127.0.0.1 that records deliveries and fails the first `fail_first` of them."""

    def __init__(self, fail_first: int) -> None:
        self.deliveries: list[dict[str, Any]] = []
        self.attempts = 0
        self.fail_first = fail_first
        lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with lock:
                    receiver.attempts += 1
                    failing = receiver.attempts <= receiver.fail_first
                    if not failing:
                        receiver.deliveries.append({"headers": dict(self.headers), "body": body})
                self.send_response(500 if failing else 204)
                self.end_headers()

            def log_message(self, *_args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    hook = Receiver(fail_first=1)
    yield hook
    hook.close()


@pytest.fixture
def alerting(
    database: Database, mock_backend: MockBackend, receiver: Receiver, tmp_path: Path
) -> Iterator[list[Gateway]]:
    config = gateway_config(
        database.url,
        mock_backend.url,
        **{
            "admin.keys": [ADMIN_KEY],
            "alerts.webhook_url": receiver.url,
            "alerts.secret": SECRET,
            "alerts.interval": 0.2,
            "alerts.backoff": 0.2,
        },
    )
    gateways = [start_gateway(tmp_path, copy.deepcopy(config)) for _ in range(2)]
    yield gateways
    for gateway in gateways:
        assert gateway.stop() == 0
        assert "Traceback" not in gateway.log(), gateway.log()[-3000:]


def _chat(gateway: Gateway, key: str, words: int) -> dict[str, Any]:
    response = httpx.post(
        f"{gateway.base_url}/chat/completions",
        headers={"Authorization": f"Bearer {key}"},
        json={"model": "mock-small", "messages": [{"role": "user", "content": "word " * words}], "max_tokens": 10},
    )
    assert response.status_code == 200, response.text
    return response.json()["usage"]


def _bodies(receiver: Receiver, team: str) -> list[dict[str, Any]]:
    return [orjson.loads(item["body"]) for item in receiver.deliveries if orjson.loads(item["body"])["team"] == team]


def test_thresholds_send_one_signed_webhook_each(
    alerting: list[Gateway], database: Database, receiver: Receiver
) -> None:
    gateway = alerting[0]
    tenant = make_team_admin(database)
    wait_for(
        lambda: (
            httpx.get(f"{gateway.base_url}/models", headers={"Authorization": f"Bearer {tenant.member_key}"}).is_success
        ),
        timeout=5,
    )
    first = _chat(gateway, tenant.member_key, 3)
    used = first["prompt_tokens"] + first["completion_tokens"]
    limit = math.ceil(used / 0.6)  # the first request alone used about 60 %
    set_override(database.engine, "team", tenant.team, {"daily_tokens": limit, "budget_mode": "soft"})

    [fifty] = wait_for(lambda: _bodies(receiver, tenant.team), timeout=15, what="the 50 % webhook")
    assert (fifty["threshold_percent"], fifty["metric"], fifty["scope"], fifty["used"], fifty["limit"]) == (
        50,
        "daily_tokens",
        "team",
        used,
        limit,
    )
    delivery = receiver.deliveries[-1]["headers"]
    assert verify(
        SECRET, delivery["X-Gateway-Timestamp"], receiver.deliveries[-1]["body"], delivery["X-Gateway-Signature"]
    )
    assert receiver.attempts >= 2  # the first attempt failed and was retried

    # Over 100 % in one step: the 100 % alert is sent, 80 % is recorded as superseded, not sent.
    while used < limit:
        usage = _chat(alerting[1], tenant.member_key, 20)
        used += usage["prompt_tokens"] + usage["completion_tokens"]
    wait_for(lambda: len(_bodies(receiver, tenant.team)) == 2, timeout=15, what="the 100 % webhook")
    with client(gateway, ADMIN_KEY) as http:
        listed = wait_for(
            lambda: (
                (rows := http.get("/admin/alerts", params={"team": tenant.team}).json()["data"])
                and {row["threshold_percent"]: row["status"] for row in rows}
                == {50: "delivered", 80: "superseded", 100: "delivered"}
                and rows
            ),
            timeout=10,
            what="the alerts listed with their delivery status",
        )
    assert len(listed) == 3
    # Both processes evaluated all along; still exactly one webhook per threshold.
    assert sorted(body["threshold_percent"] for body in _bodies(receiver, tenant.team)) == [50, 100]
