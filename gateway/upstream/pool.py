"""One aiohttp ClientSession (and so one connection pool) per deployment, and the URLs and headers to use.

The pool size is explicit (`deployments[].pool_size`); waiting for a pooled connection is bounded by the connect
timeout. There is deliberately no total timeout: it would cut long streams (the relay applies first-byte and idle
timeouts). Outbound traffic honours HTTPS_PROXY/NO_PROXY (`trust_env`), a deployment's own CA bundle and its client
certificate (mTLS). Azure OpenAI deployments get Azure's URL scheme, `api-version` and `api-key` header.
"""

from __future__ import annotations

import asyncio
import functools
import os
import ssl

import aiohttp
import orjson
from aiohttp.helpers import get_env_proxy_for_url
from yarl import URL

from gateway.routing.table import DeploymentRuntime, Endpoint
from gateway.settings import Settings


def ssl_context(deployment: DeploymentRuntime) -> ssl.SSLContext | bool:
    """The deployment's CA bundle and client certificate, or True (the system's CAs). The upstream pool and the
    route monitor (health checks, metrics scrapes) must present the same certificates."""
    config = deployment.config
    if not config.ca_bundle and not config.client_cert:
        return True
    return _load_ssl_context(config.ca_bundle, config.client_cert, config.client_key)


@functools.lru_cache(maxsize=64)
def _load_ssl_context(ca_bundle: str | None, client_cert: str | None, client_key: str | None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=ca_bundle)
    if client_cert:
        context.load_cert_chain(client_cert, client_key)
    return context


def forget_ssl_contexts() -> None:
    """After a reload: certificate files may have been replaced under the same paths."""
    _load_ssl_context.cache_clear()


def missing_api_keys(settings: Settings) -> list[str]:
    """Deployments whose `api_key_env` names an unset variable, each named by its field path, so that start-up
    and reloads refuse such a configuration instead of failing in every worker."""
    return [
        f"models.{model}.deployments.{index}.api_key_env: environment variable {deployment.api_key_env} is not set"
        for model, config in settings.models.items()
        for index, deployment in enumerate(config.deployments)
        if deployment.api_key_env and not os.environ.get(deployment.api_key_env)
    ]


def build_headers(deployment: DeploymentRuntime) -> dict[str, str]:
    config = deployment.config
    headers = {"Content-Type": "application/json", "User-Agent": "llm-gateway", **config.headers}
    if config.api_key_env:
        api_key = os.environ.get(config.api_key_env)
        if not api_key:
            raise RuntimeError(f"deployment {config.name!r}: environment variable {config.api_key_env} is not set")
        if config.kind == "azure":
            headers["api-key"] = api_key
        else:
            headers["Authorization"] = f"Bearer {api_key}"
    return headers


def proxy_for(url: str) -> str | None:
    """HTTPS_PROXY/HTTP_PROXY/NO_PROXY for one upstream URL, looked up once (it may read the environment)."""
    try:
        proxy, auth = get_env_proxy_for_url(URL(url))
    except LookupError:
        return None
    if auth is not None:  # aiohttp splits `user:password@` off the proxy URL; an authenticating proxy needs it
        proxy = proxy.with_user(auth.login).with_password(auth.password)
    return str(proxy)


def endpoint_url(endpoint: Endpoint, path: str) -> str:
    config = endpoint.deployment.config
    if config.kind == "azure":
        return f"{endpoint.base_url}{path}?api-version={config.api_version}"
    return endpoint.base_url + path


class UpstreamPool:
    def __init__(self) -> None:
        self._sessions: dict[str, aiohttp.ClientSession] = {}
        self._headers: dict[str, dict[str, str]] = {}
        self._owners: dict[str, DeploymentRuntime] = {}
        self._retiring: set[asyncio.Task[None]] = set()

    async def add(self, deployment: DeploymentRuntime) -> None:
        timeouts = deployment.timeouts
        connector = aiohttp.TCPConnector(
            limit=deployment.config.pool_size,
            limit_per_host=deployment.config.pool_size,
            ttl_dns_cache=60,
            keepalive_timeout=30,
            ssl=ssl_context(deployment),
        )
        self._headers[deployment.name] = build_headers(deployment)
        self._owners[deployment.name] = deployment
        self._sessions[deployment.name] = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(
                total=None, connect=timeouts.connect, sock_connect=timeouts.connect, sock_read=None
            ),
            json_serialize=lambda value: orjson.dumps(value).decode(),
            skip_auto_headers=("User-Agent",),
            # Not trust_env: aiohttp would then read netrc and the proxy variables in a thread on every request.
            # The proxy for each endpoint is looked up once instead (`proxy_for`).
            trust_env=False,
        )

    async def start(self, deployments: list[DeploymentRuntime]) -> None:
        for deployment in deployments:
            await self.add(deployment)

    def session(self, deployment: DeploymentRuntime) -> aiohttp.ClientSession:
        return self._sessions[deployment.name]

    def headers(self, deployment: DeploymentRuntime) -> dict[str, str]:
        return self._headers[deployment.name]

    async def sync(self, deployments: list[DeploymentRuntime], *, grace: float) -> None:
        """After a config reload: sessions for new or changed deployments; the old ones close after `grace`, so
        requests still using them finish first."""
        wanted = {deployment.name: deployment for deployment in deployments}
        for name, owner in list(self._owners.items()):
            if wanted.get(name) is not owner:
                self._retire(name, grace)
        for name, deployment in wanted.items():
            if name not in self._owners:
                await self.add(deployment)

    def _retire(self, name: str, grace: float) -> None:
        session = self._sessions.pop(name)
        self._headers.pop(name, None)
        owner = self._owners.pop(name)

        async def close_later() -> None:
            # Streams still running on the old deployment keep their connections until they end.
            waited = 0.0
            while owner.outstanding and waited < max(grace, 3600.0):
                await asyncio.sleep(1.0)
                waited += 1.0
            await session.close()

        task = asyncio.create_task(close_later(), name=f"retire-{name}")
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def close(self) -> None:
        for task in list(self._retiring):
            task.cancel()
        for session in self._sessions.values():
            await session.close()
        self._sessions.clear()
