"""One aiohttp ClientSession (and so one connection pool) per deployment.

The pool size is explicit (`deployments[].pool_size`); waiting for a pooled connection is bounded by the
connect timeout. There is deliberately no total timeout: it would cut long streams. First-byte and idle
timeouts are applied by the relay.
"""

from __future__ import annotations

import os

import aiohttp
import orjson

from gateway.routing.table import DeploymentRuntime


class UpstreamPool:
    def __init__(self, deployments: list[DeploymentRuntime]) -> None:
        self._deployments = deployments
        self._sessions: dict[str, aiohttp.ClientSession] = {}
        self._headers: dict[str, dict[str, str]] = {}

    async def start(self) -> None:
        for deployment in self._deployments:
            timeouts = deployment.timeouts
            connector = aiohttp.TCPConnector(
                limit=deployment.config.pool_size,
                limit_per_host=deployment.config.pool_size,
                ttl_dns_cache=60,
                keepalive_timeout=30,
            )
            self._sessions[deployment.name] = aiohttp.ClientSession(
                connector=connector,
                timeout=aiohttp.ClientTimeout(
                    total=None, connect=timeouts.connect, sock_connect=timeouts.connect, sock_read=None
                ),
                json_serialize=lambda value: orjson.dumps(value).decode(),
                skip_auto_headers=("User-Agent",),
                trust_env=True,  # honours HTTPS_PROXY / NO_PROXY
            )
            self._headers[deployment.name] = self._build_headers(deployment)

    @staticmethod
    def _build_headers(deployment: DeploymentRuntime) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "User-Agent": "llm-gateway"}
        env_name = deployment.config.api_key_env
        if env_name:
            api_key = os.environ.get(env_name)
            if not api_key:
                raise RuntimeError(
                    f"deployment {deployment.name!r}: environment variable {env_name} (its API key) is not set"
                )
            headers["Authorization"] = f"Bearer {api_key}"
        return headers

    def session(self, deployment: DeploymentRuntime) -> aiohttp.ClientSession:
        return self._sessions[deployment.name]

    def headers(self, deployment: DeploymentRuntime) -> dict[str, str]:
        return self._headers[deployment.name]

    async def close(self) -> None:
        for session in self._sessions.values():
            await session.close()
        self._sessions.clear()
