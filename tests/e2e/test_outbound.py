"""Outbound connections from a real gateway process: a forward proxy from the environment (HTTP_PROXY/NO_PROXY),
mTLS with a private CA, and Azure OpenAI's URL scheme and `api-key` header.

The servers the gateway talks to (the forward proxy, the TLS upstream, the fake Azure) run in this process, on an
event loop in a thread, and record what reached them; the gateway is a child process started with the environment
each test needs. No sleeps: waits are on conditions the gateway or the servers expose.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import httpx
import pytest
from aiohttp import web

from tests.harness import (
    CHAT,
    Database,
    Gateway,
    MockBackend,
    Process,
    Tenant,
    create_database,
    gateway_config,
    make_tenant,
    start_mock_backend,
    wait_for,
    write_config,
)
from tests.tls import Pki, make_pki

T = TypeVar("T")
ADMIN_KEY = "outbound-test-admin-key-0123456789abcdef"


# --- servers on a background event loop --------------------------------------------------------------------------


class BackgroundLoop:
    """An asyncio loop in a daemon thread, for servers the gateway connects to."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="outbound-servers")
        self._thread.start()
        self._cleanups: list[Any] = []

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout=15)

    def serve_app(self, app: web.Application, ssl_context: Any = None) -> int:
        """Serve an aiohttp app on 127.0.0.1, a free port; returns the port."""

        async def start() -> int:
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_context)
            await site.start()
            self._cleanups.append(runner.cleanup)
            return int(runner.addresses[0][1])

        return self.run(start())

    def close(self) -> None:
        async def cleanup() -> None:
            for step in reversed(self._cleanups):
                await step()

        self.run(cleanup())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)
        self.loop.close()


@dataclass
class SeenRequest:
    method: str
    target: str
    headers: dict[str, str]


@dataclass
class ForwardProxy:
    """A minimal HTTP forward proxy: absolute-form requests (`POST http://host:port/path HTTP/1.1`) are sent on to
    their target and the answer relayed back; `CONNECT host:port` opens a tunnel (https upstreams). Records what it
    saw; optionally requires Basic proxy credentials."""

    credentials: tuple[str, str] | None = None
    seen: list[SeenRequest] = field(default_factory=list)
    port: int = 0
    _server: asyncio.Server | None = None
    _session: aiohttp.ClientSession | None = None
    _writers: set[asyncio.StreamWriter] = field(default_factory=set)

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(trust_env=False, auto_decompress=False)
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        if self._server is not None:
            await self._server.wait_closed()
        if self._session is not None:
            await self._session.close()

    @property
    def url(self) -> str:
        if self.credentials:
            return f"http://{self.credentials[0]}:{self.credentials[1]}@127.0.0.1:{self.port}"
        return f"http://127.0.0.1:{self.port}"

    def requests_to(self, path: str) -> list[SeenRequest]:
        return [request for request in list(self.seen) if request.target.endswith(path)]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                request_line, *lines = head.decode("latin-1").rstrip("\r\n").split("\r\n")
                method, target, _version = request_line.split(" ", 2)
                headers = {}
                for line in lines:
                    name, _, value = line.partition(":")
                    headers[name.strip().lower()] = value.strip()
                self.seen.append(SeenRequest(method, target, headers))
                if method == "CONNECT" and self._authorized(headers):
                    await self._tunnel(target, reader, writer)
                    return
                assert "chunked" not in headers.get("transfer-encoding", ""), "the test proxy takes sized bodies only"
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                status, reason, reply_headers, payload = await self._forward(method, target, headers, body)
                response = [f"HTTP/1.1 {status} {reason}", f"Content-Length: {len(payload)}"]
                response += [f"{name}: {value}" for name, value in reply_headers.items()]
                writer.write(("\r\n".join(response) + "\r\n\r\n").encode("latin-1") + payload)
                await writer.drain()
        finally:
            self._writers.discard(writer)
            writer.close()

    def _authorized(self, headers: dict[str, str]) -> bool:
        if self.credentials is None:
            return True
        expected = base64.b64encode(":".join(self.credentials).encode()).decode()
        return headers.get("proxy-authorization") == f"Basic {expected}"

    async def _tunnel(self, target: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        host, _, port = target.rpartition(":")
        upstream_reader, upstream_writer = await asyncio.open_connection(host, int(port))
        self._writers.add(upstream_writer)
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            try:
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            except ConnectionError:
                pass
            finally:
                sink.close()

        try:
            await asyncio.gather(pipe(reader, upstream_writer), pipe(upstream_reader, writer))
        finally:
            self._writers.discard(upstream_writer)

    async def _forward(
        self, method: str, target: str, headers: dict[str, str], body: bytes
    ) -> tuple[int, str, dict[str, str], bytes]:
        if not self._authorized(headers):
            return 407, "Proxy Authentication Required", {"Proxy-Authenticate": 'Basic realm="test"'}, b""
        if not target.startswith("http://"):
            return 400, "Bad Request", {}, b"absolute-form requests only"
        hop_by_hop = {"host", "connection", "keep-alive", "proxy-authorization", "proxy-connection", "content-length"}
        forwarded = {name: value for name, value in headers.items() if name not in hop_by_hop}
        assert self._session is not None
        async with self._session.request(method, target, headers=forwarded, data=body) as upstream:
            payload = await upstream.read()
            keep = {
                name: upstream.headers[name]
                for name in ("Content-Type", "Content-Encoding")
                if name in upstream.headers
            }
            return upstream.status, upstream.reason or "", keep, payload


def canned_completion(model: str, content: str) -> dict[str, Any]:
    return {
        "id": "chatcmpl-canned-0001",
        "object": "chat.completion",
        "created": 1_700_000_000,
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14},
    }


@dataclass
class Received:
    method: str
    path: str
    query_string: str
    headers: dict[str, str]
    peer_subject: dict[str, str] | None
    body: dict[str, Any] | None


@dataclass
class Recorder:
    """An OpenAI-shaped upstream that answers canned completions and records each request it got."""

    content: str
    requests: list[Received] = field(default_factory=list)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{path:.*}", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.StreamResponse:
        peer = request.transport.get_extra_info("peercert") if request.transport else None
        subject = {name: value for rdn in peer["subject"] for name, value in rdn} if peer else None
        body = await request.json() if request.method == "POST" else None
        headers = {name.lower(): value for name, value in request.headers.items()}
        self.requests.append(Received(request.method, request.path, request.query_string, headers, subject, body))
        if body is None:  # /health, /metrics of a vLLM-kind deployment
            return web.Response(text="")
        completion = canned_completion(body.get("model", "?"), self.content)
        if not body.get("stream"):
            return web.json_response(completion)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        base = {key: completion[key] for key in ("id", "created", "model")} | {"object": "chat.completion.chunk"}
        events: list[dict[str, Any]] = [
            base | {"choices": [{"index": 0, "delta": {"role": "assistant", "content": word}, "finish_reason": None}]}
            for word in re.findall(r"\S+\s*", self.content)
        ]
        events.append(base | {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
        if (body.get("stream_options") or {}).get("include_usage"):
            events.append(base | {"choices": [], "usage": completion["usage"]})
        for event in events:
            await response.write(b"data: " + json.dumps(event).encode() + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response


# --- gateway processes ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def module_tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("outbound")


@pytest.fixture(scope="module")
def mock(module_tmp: Path) -> Iterator[MockBackend]:
    backend = start_mock_backend(module_tmp)
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def database(module_tmp: Path) -> Iterator[Database]:
    db = create_database("sqlite", module_tmp)
    yield db
    db.drop()


@pytest.fixture(scope="module")
def tenant(database: Database) -> Tenant:
    return make_tenant(database.engine)


@pytest.fixture
def servers() -> Iterator[BackgroundLoop]:
    background = BackgroundLoop()
    yield background
    background.close()


def outbound_config(database: Database, models: dict[str, Any]) -> dict[str, Any]:
    config = gateway_config(database.url, "http://127.0.0.1:9")
    config["models"] = models
    config["admin"] = {"keys": [ADMIN_KEY]}
    config["routing"] = {"health_interval": 0.2, "scrape_interval": 0.2, "breaker_threshold": 1000}
    config["timeouts"] = {"connect": 2, "first_byte": 10, "idle": 10}
    return config


@contextlib.contextmanager
def running_gateway(tmp: Path, config: dict[str, Any], env: dict[str, str] | None = None) -> Iterator[Gateway]:
    """A gateway whose environment has no proxy variables but those in `env` (the machine's own are dropped, in
    either case: urllib lets lower-case ones win). On exit: a clean stop and no traceback in its log."""
    config.setdefault("metering", {})["spool_dir"] = str(tmp / f"spool-{time.monotonic_ns()}")
    path = write_config(tmp, config)
    environment = {name: value for name, value in os.environ.items() if not name.lower().endswith("_proxy")}
    environment.update(GATEWAY_LOG_LEVEL="INFO", **(env or {}))
    process = Process.start(
        [sys.executable, "-m", "gateway", "serve", "--config", str(path)],
        log_path=path.with_suffix(".log"),
        env=environment,
        marker="gateway listening on ",
    )
    gateway = Gateway(process, path)
    try:
        yield gateway
    finally:
        code = gateway.stop()
    log = gateway.log()
    assert code == 0, log[-3000:]
    assert "Traceback" not in log, log[-5000:]


def chat(gateway: Gateway, tenant: Tenant, model: str) -> httpx.Response:
    return httpx.post(
        f"{gateway.base_url}/chat/completions",
        json={"model": model, "messages": CHAT, "max_tokens": 8},
        headers={"Authorization": f"Bearer {tenant.key}"},
        timeout=30,
    )


def stream_chat(gateway: Gateway, tenant: Tenant, model: str) -> list[str]:
    """A streamed chat request: the `data:` payloads of its events."""
    with httpx.stream(
        "POST",
        f"{gateway.base_url}/chat/completions",
        json={"model": model, "messages": CHAT, "stream": True},
        headers={"Authorization": f"Bearer {tenant.key}"},
        timeout=30,
    ) as response:
        assert response.status_code == 200, response.read()
        return [line[6:] for line in response.iter_lines() if line.startswith("data: ")]


def endpoint_state(gateway: Gateway, deployment: str) -> dict[str, Any]:
    response = httpx.get(f"{gateway.url}/admin/deployments", headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    response.raise_for_status()
    item = next(item for item in response.json()["data"] if item["name"] == deployment)
    return dict(item["endpoints"][0])


# --- 1. the forward proxy from the environment --------------------------------------------------------------------


def mock_model(mock: MockBackend) -> dict[str, Any]:
    return {"mock-small": {"deployments": [{"name": "via-env", "base_url": f"{mock.url}/v1"}]}}


def test_http_proxy_from_the_environment_carries_requests(
    servers: BackgroundLoop, mock: MockBackend, database: Database, tenant: Tenant, tmp_path: Path
) -> None:
    proxy = ForwardProxy()
    servers.run(proxy.start())
    try:
        config = outbound_config(database, mock_model(mock))
        with running_gateway(tmp_path, config, {"HTTP_PROXY": proxy.url}) as gateway:
            response = chat(gateway, tenant, "mock-small")
            assert response.status_code == 200, response.text
            assert response.json()["choices"][0]["message"]["content"]
            posts = proxy.requests_to("/v1/chat/completions")
            assert [(seen.method, seen.target) for seen in posts] == [("POST", f"{mock.url}/v1/chat/completions")], (
                "the chat request did not go through the proxy"
            )
            assert "authorization" not in posts[0].headers  # a vLLM deployment without api_key_env sends none
    finally:
        servers.run(proxy.stop())


def test_no_proxy_bypasses_the_proxy(
    servers: BackgroundLoop, mock: MockBackend, database: Database, tenant: Tenant, tmp_path: Path
) -> None:
    proxy = ForwardProxy()
    servers.run(proxy.start())
    try:
        config = outbound_config(database, mock_model(mock))
        env = {"HTTP_PROXY": proxy.url, "HTTPS_PROXY": proxy.url, "NO_PROXY": "127.0.0.1"}
        with running_gateway(tmp_path, config, env) as gateway:
            # The background monitor (metrics scrapes) has reached the worker too, directly.
            wait_for(lambda: endpoint_state(gateway, "via-env")["scraped_at"], timeout=10, what="a metrics scrape")
            response = chat(gateway, tenant, "mock-small")
            assert response.status_code == 200, response.text
        assert proxy.seen == [], f"NO_PROXY=127.0.0.1 but the proxy saw {proxy.seen}"
    finally:
        servers.run(proxy.stop())


def test_proxy_credentials_in_http_proxy_are_sent(
    servers: BackgroundLoop, mock: MockBackend, database: Database, tenant: Tenant, tmp_path: Path
) -> None:
    proxy = ForwardProxy(credentials=("gw-user", "s3cret"))
    servers.run(proxy.start())
    try:
        config = outbound_config(database, mock_model(mock))
        with running_gateway(tmp_path, config, {"HTTP_PROXY": proxy.url}) as gateway:
            response = chat(gateway, tenant, "mock-small")
            assert proxy.requests_to("/v1/chat/completions"), "the request did not go through the proxy at all"
            assert response.status_code == 200, response.text
    finally:
        servers.run(proxy.stop())


# --- 2. mTLS with a private CA -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(module_tmp: Path) -> Pki:
    return make_pki(module_tmp / "pki")


def test_mtls_with_a_private_ca(
    servers: BackgroundLoop, pki: Pki, database: Database, tenant: Tenant, tmp_path: Path
) -> None:
    upstream = Recorder(content="hello over mutual TLS")
    port = servers.serve_app(upstream.app(), ssl_context=pki.server_context())
    base = f"https://127.0.0.1:{port}/v1"
    tls = {"ca_bundle": str(pki.ca), "client_cert": str(pki.client_cert), "client_key": str(pki.client_key)}
    no_cert = {"ca_bundle": str(pki.ca)}
    no_ca = {"client_cert": str(pki.client_cert), "client_key": str(pki.client_key)}  # system CAs only
    models = {
        name: {"retry": {"attempts": 1}, "deployments": [{"name": name, "kind": "openai", "base_url": base, **extra}]}
        for name, extra in (("tls-ok", tls), ("tls-no-cert", no_cert), ("tls-no-ca", no_ca))
    }
    with running_gateway(tmp_path, outbound_config(database, models)) as gateway:
        response = chat(gateway, tenant, "tls-ok")
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["message"]["content"] == "hello over mutual TLS"
        assert response.json()["model"] == "tls-ok"
        assert [request.path for request in upstream.requests] == ["/v1/chat/completions"]
        assert upstream.requests[0].peer_subject == {"commonName": "llm-gateway test client"}

        for model in ("tls-no-cert", "tls-no-ca"):
            response = chat(gateway, tenant, model)
            assert response.status_code == 502, (model, response.text)
            error = response.json()["error"]
            assert error["code"] == "upstream_unreachable", (model, error)
            assert error["type"] == "server_error"
        assert len(upstream.requests) == 1, "a request without a valid TLS session reached the upstream"


def test_https_proxy_tunnels_to_an_mtls_upstream(
    servers: BackgroundLoop, pki: Pki, database: Database, tenant: Tenant, tmp_path: Path
) -> None:
    """HTTPS_PROXY: a CONNECT tunnel through the proxy, and TLS (private CA, client certificate) inside it."""
    upstream = Recorder(content="tunnelled")
    port = servers.serve_app(upstream.app(), ssl_context=pki.server_context())
    proxy = ForwardProxy()
    servers.run(proxy.start())
    try:
        deployment = {
            "name": "tls-tunnel",
            "kind": "openai",
            "base_url": f"https://127.0.0.1:{port}/v1",
            "ca_bundle": str(pki.ca),
            "client_cert": str(pki.client_cert),
            "client_key": str(pki.client_key),
        }
        config = outbound_config(database, {"tls-tunnel": {"deployments": [deployment]}})
        with running_gateway(tmp_path, config, {"HTTPS_PROXY": proxy.url, "NO_PROXY": "localhost"}) as gateway:
            response = chat(gateway, tenant, "tls-tunnel")
            assert response.status_code == 200, response.text
            assert response.json()["choices"][0]["message"]["content"] == "tunnelled"
        assert [(seen.method, seen.target) for seen in proxy.seen] == [("CONNECT", f"127.0.0.1:{port}")]
        assert upstream.requests[0].peer_subject == {"commonName": "llm-gateway test client"}
    finally:
        servers.run(proxy.stop())


def test_health_checks_of_an_mtls_vllm_worker_use_its_certificates(
    servers: BackgroundLoop, pki: Pki, database: Database, tenant: Tenant, tmp_path: Path
) -> None:
    upstream = Recorder(content="vllm over mutual TLS")
    port = servers.serve_app(upstream.app(), ssl_context=pki.server_context())
    deployment = {
        "name": "tls-vllm",
        "kind": "vllm",
        "base_url": f"https://127.0.0.1:{port}/v1",
        "ca_bundle": str(pki.ca),
        "client_cert": str(pki.client_cert),
        "client_key": str(pki.client_key),
    }
    with running_gateway(tmp_path, outbound_config(database, {"tls-vllm": {"deployments": [deployment]}})) as gateway:

        def checked() -> bool:
            reached = any(request.path == "/health" for request in upstream.requests)
            return reached or not endpoint_state(gateway, "tls-vllm")["healthy"]

        wait_for(checked, timeout=10, what="a health check to reach the worker or fail three times")
        assert any(request.path == "/health" for request in upstream.requests)
        assert endpoint_state(gateway, "tls-vllm")["healthy"]


# --- 3. Azure OpenAI --------------------------------------------------------------------------------------------


def test_azure_deployment_url_api_version_and_api_key(
    servers: BackgroundLoop, database: Database, tenant: Tenant, tmp_path: Path
) -> None:
    upstream = Recorder(content="hello from azure")
    port = servers.serve_app(upstream.app())
    deployment = {
        "name": "azure-dep",
        "kind": "azure",
        "api_version": "2024-06-01",
        "api_key_env": "AZURE_KEY",
        "base_url": f"http://127.0.0.1:{port}/openai/deployments/my-dep",
    }
    azure_key = "azure-secret-key-0123456789"
    config = outbound_config(database, {"gpt-4o": {"deployments": [deployment]}})
    with running_gateway(tmp_path, config, {"AZURE_KEY": azure_key}) as gateway:
        response = chat(gateway, tenant, "gpt-4o")
        assert response.status_code == 200, response.text
        answer = response.json()
        assert answer["id"] == "chatcmpl-canned-0001"
        assert answer["choices"][0]["message"]["content"] == "hello from azure"
        assert answer["usage"]["total_tokens"] == 14

    assert len(upstream.requests) == 1
    request = upstream.requests[0]
    assert request.method == "POST"
    assert request.path == "/openai/deployments/my-dep/chat/completions"
    assert request.query_string == "api-version=2024-06-01"
    assert request.headers["api-key"] == azure_key
    assert "authorization" not in request.headers
    assert not any(tenant.key in value for value in request.headers.values()), "the client's key went upstream"
    assert request.body is not None and request.body["messages"] == CHAT


def test_azure_streaming_uses_the_same_url_and_key(
    servers: BackgroundLoop, database: Database, tenant: Tenant, tmp_path: Path
) -> None:
    upstream = Recorder(content="streamed from azure")
    port = servers.serve_app(upstream.app())
    deployment = {
        "name": "azure-stream",
        "kind": "azure",
        "api_version": "2024-06-01",
        "api_key_env": "AZURE_KEY",
        "base_url": f"http://127.0.0.1:{port}/openai/deployments/my-dep",
    }
    config = outbound_config(database, {"gpt-4o": {"deployments": [deployment]}})
    with running_gateway(tmp_path, config, {"AZURE_KEY": "azure-stream-key"}) as gateway:
        data = stream_chat(gateway, tenant, "gpt-4o")
    assert data[-1] == "[DONE]"
    chunks = [json.loads(item) for item in data[:-1]]
    text = "".join(choice["delta"].get("content") or "" for chunk in chunks for choice in chunk["choices"])
    assert text == "streamed from azure"
    assert not any("usage" in chunk and chunk["usage"] for chunk in chunks)  # the client did not ask for usage
    request = upstream.requests[0]
    assert (request.path, request.query_string) == (
        "/openai/deployments/my-dep/chat/completions",
        "api-version=2024-06-01",
    )
    assert request.headers["api-key"] == "azure-stream-key"
    assert "authorization" not in request.headers


def test_unset_api_key_env_stops_the_gateway_with_a_clear_error(database: Database, tmp_path: Path) -> None:
    deployment = {
        "name": "azure-nokey",
        "kind": "azure",
        "api_version": "2024-06-01",
        "api_key_env": "OUTBOUND_TEST_UNSET_KEY",
        "base_url": "http://127.0.0.1:9/openai/deployments/my-dep",
    }
    config = outbound_config(database, {"gpt-4o": {"deployments": [deployment]}})
    config["metering"] = {"spool_dir": str(tmp_path / "spool")}
    path = write_config(tmp_path, config)
    environment = {name: value for name, value in os.environ.items() if name != "OUTBOUND_TEST_UNSET_KEY"}
    log_path = tmp_path / "unset-key.log"
    with open(log_path, "wb") as log:
        popen = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve", "--config", str(path)],
            stdout=subprocess.DEVNULL,
            stderr=log,
            env=environment,
        )
    try:
        # Either it stops, or (the bug) a worker dies and is restarted: whichever comes first.
        wait_for(
            lambda: popen.poll() is not None or "restarting it" in log_path.read_text(errors="replace"),
            timeout=30,
            what="the gateway to stop or to restart a worker",
        )
        text = log_path.read_text(errors="replace")
        assert popen.poll() not in (None, 0), text[-3000:]
        assert "OUTBOUND_TEST_UNSET_KEY" in text and "is not set" in text
        assert "Traceback" not in text, text[-3000:]
    finally:
        if popen.poll() is None:
            popen.terminate()
            try:
                popen.wait(30)
            except subprocess.TimeoutExpired:
                popen.kill()
                popen.wait()
