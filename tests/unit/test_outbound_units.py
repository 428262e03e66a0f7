"""Outbound plumbing as units: upstream URLs and headers per deployment kind, the proxy chosen from the
environment, DNS discovery of vLLM workers, and the settings rules for deployments."""

from __future__ import annotations

import asyncio
import os
import socket
from typing import Any

import pytest
from pydantic import ValidationError
from yarl import URL

from gateway.routing.monitor import resolve_workers
from gateway.routing.table import DeploymentRuntime, Endpoint
from gateway.settings import Deployment, SettingsError, Timeouts, parse_settings
from gateway.upstream.errors import error_from_upstream
from gateway.upstream.pool import build_headers, endpoint_url, missing_api_keys, proxy_for


def runtime(**config: Any) -> DeploymentRuntime:
    config.setdefault("name", "d")
    if not any(key in config for key in ("base_url", "base_urls", "dns_base_url")):
        config["base_url"] = "http://10.0.0.5:8000/v1"
    deployment = Deployment.model_validate(config)
    return DeploymentRuntime(config=deployment, model="m", timeouts=Timeouts(), upstream_model="m")


def endpoint(**config: Any) -> Endpoint:
    deployment = runtime(**config)
    deployment.set_urls(deployment.config.static_urls, (3, 5.0))
    return deployment.endpoints[0]


# --- endpoint_url ------------------------------------------------------------------------------------------------


def test_endpoint_url_vllm_and_openai_append_the_path() -> None:
    assert endpoint(kind="vllm").base_url == "http://10.0.0.5:8000/v1"
    assert endpoint_url(endpoint(kind="vllm"), "/chat/completions") == "http://10.0.0.5:8000/v1/chat/completions"
    openai = endpoint(kind="openai", base_url="https://api.openai.com/v1/")  # the trailing slash is dropped
    assert endpoint_url(openai, "/embeddings") == "https://api.openai.com/v1/embeddings"


def test_endpoint_url_azure_adds_the_api_version() -> None:
    azure = endpoint(
        kind="azure",
        api_version="2024-06-01",
        base_url="https://example.openai.azure.com/openai/deployments/my-dep",
    )
    assert (
        endpoint_url(azure, "/chat/completions")
        == "https://example.openai.azure.com/openai/deployments/my-dep/chat/completions?api-version=2024-06-01"
    )
    assert endpoint_url(azure, "/embeddings").endswith("/my-dep/embeddings?api-version=2024-06-01")


def test_endpoint_url_one_per_worker_of_a_pool() -> None:
    pool = runtime(base_urls=["http://10.0.0.5:8000/v1", "http://10.0.0.6:8000/v1/"])
    pool.set_urls(pool.config.static_urls, (3, 5.0))
    assert [endpoint_url(e, "/completions") for e in pool.endpoints] == [
        "http://10.0.0.5:8000/v1/completions",
        "http://10.0.0.6:8000/v1/completions",
    ]


# --- build_headers -----------------------------------------------------------------------------------------------


def test_headers_openai_kind_send_a_bearer_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROVIDER_KEY", "sk-provider-123")
    headers = build_headers(runtime(kind="openai", api_key_env="PROVIDER_KEY", headers={"OpenAI-Organization": "o"}))
    assert headers["Authorization"] == "Bearer sk-provider-123"
    assert "api-key" not in headers
    assert headers["OpenAI-Organization"] == "o"
    assert headers["Content-Type"] == "application/json"


def test_headers_azure_kind_send_api_key_and_no_authorization(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AZURE_KEY", "azure-123")
    headers = build_headers(
        runtime(kind="azure", api_version="2024-06-01", api_key_env="AZURE_KEY", headers={"x-ms-client": "gw"})
    )
    assert headers["api-key"] == "azure-123"
    assert not any(name.lower() == "authorization" for name in headers)
    assert headers["x-ms-client"] == "gw"


def test_headers_without_api_key_env_carry_no_credentials() -> None:
    headers = build_headers(runtime(kind="vllm", headers={"X-Pool": "a"}))
    assert {name.lower() for name in headers} == {"content-type", "user-agent", "x-pool"}


def test_the_configured_key_wins_over_an_authorization_in_extra_headers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROVIDER_KEY", "sk-real")
    headers = build_headers(runtime(kind="openai", api_key_env="PROVIDER_KEY", headers={"Authorization": "x"}))
    assert headers["Authorization"] == "Bearer sk-real"


@pytest.mark.parametrize("value", [None, ""])
def test_headers_missing_key_variable_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, value: str | None) -> None:
    if value is None:
        monkeypatch.delenv("MISSING_PROVIDER_KEY", raising=False)
    else:
        monkeypatch.setenv("MISSING_PROVIDER_KEY", value)
    with pytest.raises(RuntimeError, match=r"deployment 'prov'.*MISSING_PROVIDER_KEY is not set"):
        build_headers(runtime(name="prov", kind="openai", api_key_env="MISSING_PROVIDER_KEY"))


def test_missing_api_keys_names_each_unset_variable_by_its_field(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SET_PROVIDER_KEY", "sk-upstream")
    monkeypatch.delenv("UNSET_PROVIDER_KEY", raising=False)
    provider = {"kind": "openai", "base_url": "https://api.example.com/v1"}
    settings = parse_settings(
        {
            "database": {"url": "sqlite:///unused.db"},
            "auth": {"pepper": "p" * 32},
            "models": {
                "ok": {"deployments": [{"name": "a", "api_key_env": "SET_PROVIDER_KEY", **provider}]},
                "broken": {
                    "deployments": [
                        {"name": "b", "base_url": "http://10.0.0.5:8000/v1"},
                        {"name": "c", "api_key_env": "UNSET_PROVIDER_KEY", **provider},
                    ]
                },
            },
        }
    )
    assert missing_api_keys(settings) == [
        "models.broken.deployments.1.api_key_env: environment variable UNSET_PROVIDER_KEY is not set"
    ]


# --- proxy_for ---------------------------------------------------------------------------------------------------


@pytest.fixture
def no_proxy_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No proxy variable from the machine (urllib reads them in any case; lower-case ones win)."""
    for name in list(os.environ):
        if name.lower().endswith("_proxy") or name == "REQUEST_METHOD":
            monkeypatch.delenv(name)
    monkeypatch.setenv("NETRC", os.devnull)
    return monkeypatch


def test_proxy_for_without_variables_is_direct(no_proxy_env: pytest.MonkeyPatch) -> None:
    assert proxy_for("https://api.openai.com/v1") is None
    assert proxy_for("http://10.0.0.5:8000/v1") is None


def test_proxy_for_by_scheme(no_proxy_env: pytest.MonkeyPatch) -> None:
    no_proxy_env.setenv("HTTPS_PROXY", "http://secure-proxy.corp:3128")
    assert proxy_for("https://api.openai.com/v1") == "http://secure-proxy.corp:3128"
    assert proxy_for("http://10.0.0.5:8000/v1") is None  # HTTPS_PROXY is for https URLs only
    no_proxy_env.setenv("HTTP_PROXY", "http://plain-proxy.corp:8080")
    assert proxy_for("http://10.0.0.5:8000/v1") == "http://plain-proxy.corp:8080"
    assert proxy_for("https://api.openai.com/v1") == "http://secure-proxy.corp:3128"


def test_proxy_for_lower_case_variables(no_proxy_env: pytest.MonkeyPatch) -> None:
    no_proxy_env.setenv("https_proxy", "http://lower-proxy.corp:3128")
    assert proxy_for("https://api.openai.com/v1") == "http://lower-proxy.corp:3128"


def test_proxy_for_no_proxy(no_proxy_env: pytest.MonkeyPatch) -> None:
    no_proxy_env.setenv("HTTP_PROXY", "http://plain-proxy.corp:8080")
    no_proxy_env.setenv("HTTPS_PROXY", "http://secure-proxy.corp:3128")
    no_proxy_env.setenv("NO_PROXY", "10.0.0.5,.svc.cluster.local,localhost")
    assert proxy_for("http://10.0.0.5:8000/v1") is None
    assert proxy_for("http://vllm-0.vllm.svc.cluster.local:8000/v1") is None
    assert proxy_for("http://localhost:8000/v1") is None
    assert proxy_for("http://10.0.0.6:8000/v1") == "http://plain-proxy.corp:8080"
    assert proxy_for("https://api.openai.com/v1") == "http://secure-proxy.corp:3128"
    no_proxy_env.setenv("NO_PROXY", "*")
    assert proxy_for("https://api.openai.com/v1") is None


def test_proxy_for_keeps_the_proxy_credentials(no_proxy_env: pytest.MonkeyPatch) -> None:
    no_proxy_env.setenv("HTTPS_PROXY", "http://gw-user:p%40ss@secure-proxy.corp:3128")
    proxy = proxy_for("https://api.openai.com/v1")
    assert proxy is not None
    assert (URL(proxy).host, URL(proxy).user, URL(proxy).password) == ("secure-proxy.corp", "gw-user", "p@ss")


def test_a_proxy_refusing_the_gateway_is_a_502_not_a_407() -> None:
    error = error_from_upstream(407, b"", {"Proxy-Authenticate": "Basic"}, "m")
    assert error.status == 502
    assert error.type == "server_error"


# --- resolve_workers ---------------------------------------------------------------------------------------------


async def test_resolve_workers_localhost_one_url_per_address() -> None:
    infos = socket.getaddrinfo("localhost", 8000, type=socket.SOCK_STREAM)
    addresses = sorted({str(info[4][0]) for info in infos})
    urls = await resolve_workers("http://localhost:8000/v1")
    expected = [f"http://[{a}]:8000/v1" if ":" in a else f"http://{a}:8000/v1" for a in addresses]
    assert urls == expected
    assert "http://127.0.0.1:8000/v1" in urls


async def test_resolve_workers_ipv6_in_brackets_deduplicated_port_and_path_kept(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[tuple[Any, ...]] = []

    async def fake_getaddrinfo(host: str, port: int, **kwargs: Any) -> list[tuple[Any, ...]]:
        calls.append((host, port, kwargs))
        v4, v6 = socket.AF_INET, socket.AF_INET6
        return [
            (v4, socket.SOCK_STREAM, 6, "", ("10.1.0.7", port)),
            (v6, socket.SOCK_STREAM, 6, "", ("fd00::7", port, 0, 0)),
            (v4, socket.SOCK_STREAM, 6, "", ("10.1.0.3", port)),
            (v4, socket.SOCK_STREAM, 6, "", ("10.1.0.7", port)),  # a duplicate (several A answers)
        ]

    monkeypatch.setattr(asyncio.get_running_loop(), "getaddrinfo", fake_getaddrinfo)
    assert await resolve_workers("http://vllm.pool.svc:8000/v1/") == [
        "http://10.1.0.3:8000/v1",
        "http://10.1.0.7:8000/v1",
        "http://[fd00::7]:8000/v1",
    ]
    assert calls[0][:2] == ("vllm.pool.svc", 8000)
    # Default ports are written out; the path is kept.
    assert (await resolve_workers("https://vllm.pool.svc/prefix/v1"))[0] == "https://10.1.0.3:443/prefix/v1"
    assert (await resolve_workers("http://vllm.pool.svc/v1"))[0] == "http://10.1.0.3:80/v1"


async def test_resolve_workers_ipv6_literal() -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this machine")
    assert await resolve_workers("http://[::1]:8001/v1") == ["http://[::1]:8001/v1"]


# --- settings rules ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sources",
    [
        {},
        {"base_url": "http://a:1/v1", "base_urls": ["http://b:1/v1"]},
        {"base_url": "http://a:1/v1", "dns_base_url": "http://pool:1/v1"},
        {"base_urls": ["http://b:1/v1"], "dns_base_url": "http://pool:1/v1"},
        {"base_urls": []},
    ],
)
def test_deployment_needs_exactly_one_url_source(sources: dict[str, Any]) -> None:
    with pytest.raises(ValidationError, match="exactly one of base_url, base_urls, dns_base_url"):
        Deployment.model_validate({"name": "d", **sources})


@pytest.mark.parametrize(
    "sources",
    [
        {"base_url": "http://a:1/v1"},
        {"base_urls": ["http://a:1/v1", "http://b:1/v1"]},
        {"dns_base_url": "http://p:1/v1"},
    ],
)
def test_deployment_with_one_url_source_is_valid(sources: dict[str, Any]) -> None:
    Deployment.model_validate({"name": "d", **sources})


def test_azure_needs_api_version() -> None:
    with pytest.raises(ValidationError, match="azure deployments need api_version"):
        Deployment.model_validate({"name": "d", "kind": "azure", "base_url": "https://x.openai.azure.com/openai"})
    ok = Deployment.model_validate(
        {"name": "d", "kind": "azure", "api_version": "2024-06-01", "base_url": "https://x.openai.azure.com/openai"}
    )
    assert ok.api_version == "2024-06-01"


def test_client_key_needs_client_cert() -> None:
    with pytest.raises(ValidationError, match="client_key needs client_cert"):
        Deployment.model_validate({"name": "d", "base_url": "https://a/v1", "client_key": "/k.pem"})
    # A certificate file that holds its key too needs no client_key.
    Deployment.model_validate({"name": "d", "base_url": "https://a/v1", "client_cert": "/both.pem"})


def test_bad_urls_and_kinds_are_rejected() -> None:
    for bad in (
        {"base_url": "ftp://a/v1"},
        {"base_urls": ["10.0.0.5:8000/v1"]},
        {"dns_base_url": "pool:8000"},
        {"base_url": "http://a/v1", "kind": "anthropic"},
    ):
        with pytest.raises(ValidationError):
            Deployment.model_validate({"name": "d", **bad})


def test_settings_error_names_the_deployment_path() -> None:
    raw = {
        "auth": {"pepper": "0123456789abcdef0123"},
        "models": {"m": {"deployments": [{"name": "az", "kind": "azure", "base_url": "https://x/openai"}]}},
    }
    with pytest.raises(SettingsError, match=r"models\.m\.deployments\.0.*azure deployments need api_version"):
        parse_settings(raw)
