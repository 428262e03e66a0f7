"""The access log line: the fields operators need, never secrets, prompts only when opted in."""

from __future__ import annotations

import json
import logging
import uuid

import pytest

from gateway import access_log
from gateway.auth.store import KeyRecord
from gateway.context import RequestContext
from gateway.logs import JsonFormatter
from gateway.settings import Logging

SECRET = "sk-gw-AbCdEfGhIjKl-abcdefghijklmnopqrstuvwxyz012345"


def _context() -> RequestContext:
    ctx = RequestContext.begin(uuid.UUID("01900000-0000-7000-8000-000000000001"), "chat")
    ctx.client_request_id = "client-42"
    ctx.key = KeyRecord(
        key_id="AbCdEfGhIjKl",
        secret_hmac=b"\0" * 32,
        name="ci",
        team_id=1,
        team_name="search",
        user_id=2,
        user_name="alice",
        allowed_models=None,
        tags=(),
        expires_at=None,
        inactive_reason=None,
    )
    ctx.model, ctx.status, ctx.stream = "mock-small", 200, True
    ctx.payload = {"model": "mock-small", "messages": [{"role": "user", "content": "top secret plans"}]}
    return ctx


ROW = {
    "deployment": "mock-a",
    "upstream_model": "mock-small",
    "prompt_tokens": 12,
    "completion_tokens": 7,
    "cached_prompt_tokens": 0,
    "usage_source": "backend",
    "cost_nanousd": 6000,
}


@pytest.mark.parametrize("log_prompts", [False, True])
def test_one_json_line_with_the_fields_and_no_secrets(caplog: pytest.LogCaptureFixture, log_prompts: bool) -> None:
    access_log.configure(Logging(log_prompts=log_prompts))
    try:
        with caplog.at_level(logging.INFO, logger="gateway.access"):
            access_log.log_access(_context(), ROW)
    finally:
        access_log.configure(Logging())
    [record] = caplog.records
    line = JsonFormatter().format(record)
    entry = json.loads(line)
    assert entry["logger"] == "gateway.access"
    assert entry["request_id"] == "01900000-0000-7000-8000-000000000001" and entry["client_request_id"] == "client-42"
    assert (entry["team"], entry["key"], entry["user"], entry["model"], entry["deployment"]) == (
        "search",
        "sk-gw-AbCdEfGhIjKl",
        "alice",
        "mock-small",
        "mock-a",
    )
    assert (entry["prompt_tokens"], entry["completion_tokens"], entry["cost_nanousd"], entry["status"]) == (
        12,
        7,
        6000,
        200,
    )
    assert entry["latency_ms"] >= 0
    assert SECRET not in line and "abcdefghijklmnop" not in line
    assert ("top secret plans" in line) is log_prompts


def test_disabled_writes_nothing(caplog: pytest.LogCaptureFixture) -> None:
    access_log.configure(Logging(access_log=False))
    try:
        with caplog.at_level(logging.INFO, logger="gateway.access"):
            access_log.log_access(_context(), ROW)
    finally:
        access_log.configure(Logging())
    assert not caplog.records
