"""Every way a request can go wrong gets the right status and an OpenAI-shaped error, never a traceback."""

from __future__ import annotations

import time
from datetime import timedelta

import httpx
import openai
import pytest

from tests.conftest import wait_key_known
from tests.harness import Database, Gateway, MockBackend, Tenant, make_tenant, run_cli, wait_for

CHAT = {"model": "mock-small", "messages": [{"role": "user", "content": "hello"}]}


def post(
    gateway: Gateway,
    key: str | None,
    body: object = None,
    *,
    content: bytes | None = None,
    path: str = "/chat/completions",
) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if content is not None:
        return httpx.post(gateway.base_url + path, headers=headers, content=content)
    return httpx.post(gateway.base_url + path, headers=headers, json=body)


def assert_openai_error(
    response: httpx.Response, status: int, *, code: object = None, type_: str | None = None, param: str | None = None
) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert "Traceback" not in response.text and 'File "' not in response.text
    if code is not None:
        assert error["code"] == code
    if type_ is not None:
        assert error["type"] == type_
    if param is not None:
        assert error["param"] == param
    assert response.headers.get("x-gateway-request-id")
    return error


def test_missing_and_malformed_keys_are_401(gateway: Gateway) -> None:
    for key in (None, "sk-nonsense", "sk-gw-AAAAAAAAAAAA-" + "B" * 32, "Basic abc"):
        response = post(gateway, key, CHAT)
        assert_openai_error(response, 401, code="invalid_api_key", type_="invalid_request_error")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=gateway.base_url, api_key="sk-wrong", max_retries=0).models.list()


def test_right_id_wrong_secret_is_401(gateway: Gateway, tenant: Tenant) -> None:
    forged = tenant.key[:-4] + ("AAAA" if not tenant.key.endswith("AAAA") else "BBBB")
    assert_openai_error(post(gateway, forged, CHAT), 401, code="invalid_api_key")


def test_expired_key_is_401(gateway: Gateway, database: Database) -> None:
    tenant = make_tenant(database.engine, expires_in=timedelta(seconds=1))
    deadline = time.time() + 1
    wait_key_known(gateway, tenant.key)
    wait_for(lambda: time.time() > deadline, what="the key to expire")
    error = assert_openai_error(post(gateway, tenant.key, CHAT), 401, code="invalid_api_key")
    assert "expired" in error["message"]


def test_disabled_team_and_user_disable_their_keys(gateway: Gateway, database: Database) -> None:
    tenant = make_tenant(database.engine)
    wait_key_known(gateway, tenant.key)
    assert post(gateway, tenant.key, CHAT).status_code == 200

    run_cli("teams", "disable", tenant.team, config=gateway.config_path)
    wait_for(lambda: post(gateway, tenant.key, CHAT).status_code == 401, timeout=2, what="team disable")
    run_cli("teams", "enable", tenant.team, config=gateway.config_path)
    wait_for(lambda: post(gateway, tenant.key, CHAT).status_code == 200, timeout=2, what="team enable")
    run_cli("users", "disable", tenant.user, config=gateway.config_path)
    error = wait_for(
        lambda: post(gateway, tenant.key, CHAT).status_code == 401 and post(gateway, tenant.key, CHAT),
        timeout=2,
        what="user disable",
    )
    assert "user disabled" in error.json()["error"]["message"]


def test_disallowed_model_is_403_unknown_model_is_404(gateway: Gateway, database: Database) -> None:
    tenant = make_tenant(database.engine, models=["mock-small"])
    wait_key_known(gateway, tenant.key)
    assert_openai_error(post(gateway, tenant.key, {**CHAT, "model": "mock-large"}), 403, code="model_not_allowed")
    assert_openai_error(
        post(gateway, tenant.key, {**CHAT, "model": "no-such-model"}), 404, code="model_not_found", param="model"
    )
    client = openai.OpenAI(base_url=gateway.base_url, api_key=tenant.key, max_retries=0)
    with pytest.raises(openai.PermissionDeniedError):
        client.chat.completions.create(model="mock-large", messages=CHAT["messages"])
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-nothing", messages=CHAT["messages"])


@pytest.mark.parametrize(
    "content",
    [b"{not json", b"", b"[1, 2, 3]", b'"just a string"', b'{"model": "mock-small", "messages": [', b"\xff\xfe"],
)
def test_malformed_json_is_400(gateway: Gateway, tenant: Tenant, content: bytes) -> None:
    assert_openai_error(post(gateway, tenant.key, content=content), 400, type_="invalid_request_error")


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": [{"role": "user", "content": "x"}]}, "model"),
        ({"model": 42, "messages": []}, "model"),
        ({"model": "mock-small"}, "messages"),
        ({"model": "mock-small", "messages": "hello"}, "messages"),
        ({"model": "mock-small", "messages": ["hello"]}, "messages"),
        ({**CHAT, "stream": "yes"}, "stream"),
        ({**CHAT, "max_tokens": "ten"}, "max_tokens"),
        ({**CHAT, "max_tokens": -1}, "max_tokens"),
        ({**CHAT, "stream_options": "usage"}, "stream_options"),
        ({**CHAT, "user": 7}, "user"),
    ],
)
def test_wrong_field_types_are_400_naming_the_field(gateway: Gateway, tenant: Tenant, body: dict, param: str) -> None:
    assert_openai_error(post(gateway, tenant.key, body), 400, type_="invalid_request_error", param=param)


def test_upstream_validation_errors_pass_through_in_openai_shape(
    gateway: Gateway, backend: MockBackend, tenant: Tenant
) -> None:
    backend.set_faults({"mode": "error", "status": 400, "times": 1})
    error = assert_openai_error(post(gateway, tenant.key, CHAT), 400, type_="invalid_request_error")
    assert error["code"] is None or isinstance(error["code"], str)


def test_body_over_the_limit_is_413(gateway: Gateway, tenant: Tenant) -> None:
    huge = {**CHAT, "messages": [{"role": "user", "content": "x" * (70 * 1024)}]}
    assert_openai_error(post(gateway, tenant.key, huge), 413, code="request_too_large")


def test_unknown_route_and_method(gateway: Gateway, tenant: Tenant) -> None:
    assert_openai_error(httpx.get(gateway.base_url + "/nothing-here"), 404)
    assert_openai_error(httpx.get(gateway.base_url + "/chat/completions"), 405)


def test_backend_down_is_502(gateway: Gateway, tenant: Tenant, database: Database) -> None:
    error = assert_openai_error(
        post(gateway, tenant.key, {**CHAT, "model": "mock-dead"}), 502, code="upstream_unreachable"
    )
    assert "127.0.0.1" not in error["message"] and "http" not in error["message"]
    wait_for(lambda: database.count_usage(key_id=tenant.key_id, status_code=502) == 1, what="the 502 usage row")


def test_backend_stalling_is_504(gateway: Gateway, backend: MockBackend, tenant: Tenant, database: Database) -> None:
    backend.set_faults({"mode": "stall", "times": 2})
    assert_openai_error(post(gateway, tenant.key, CHAT), 504, code="upstream_timeout")
    assert_openai_error(post(gateway, tenant.key, {**CHAT, "stream": True}), 504, code="upstream_timeout")
    wait_for(lambda: database.count_usage(key_id=tenant.key_id, status_code=504) == 2, what="two 504 usage rows")


def test_upstream_error_statuses_pass_through(gateway: Gateway, backend: MockBackend, tenant: Tenant) -> None:
    backend.set_faults({"mode": "error", "status": 503, "times": 1})
    assert_openai_error(post(gateway, tenant.key, CHAT), 503)
    # The upstream refusing the gateway's own credentials is not the client's 401.
    backend.set_faults({"mode": "error", "status": 401, "times": 1})
    assert_openai_error(post(gateway, tenant.key, CHAT), 502, code="upstream_auth_failed")
    backend.set_faults({"mode": "error", "status": 429, "headers": {"retry-after": "3"}, "times": 1})
    response = post(gateway, tenant.key, CHAT)
    assert_openai_error(response, 429)
    assert response.headers["retry-after"] == "3"
    # The gateway honours it: that endpoint gets no new work for 3 s, so the next request is told to wait too.
    again = post(gateway, tenant.key, CHAT)
    assert_openai_error(again, 429)
    assert 0 < int(again.headers["retry-after-ms"]) <= 3000
    assert backend.stats()["requests"] == 3
