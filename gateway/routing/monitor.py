"""Background knowledge of the endpoints: vLLM's own load figures, active health checks, DNS discovery.

Every `routing.scrape_interval` each vLLM worker's `/metrics` is read (running and waiting requests, KV cache use,
prefix cache hits, token counters); every `routing.health_interval` its `/health` is checked: a failing worker
is taken out of rotation, counts against its breaker, and comes back when it answers again. Parsing happens in a
thread, so a large metrics page never blocks the event loop. Deployments given as `dns_base_url` are
re-resolved every `routing.dns_interval`: each address is a worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from gateway import metrics
from gateway.db.engine import SqlRunner
from gateway.db.schema import worker_token_samples
from gateway.routing.choice import expected_load
from gateway.routing.table import Endpoint, RouteTable
from gateway.settings import Routing

log = logging.getLogger(__name__)

UNHEALTHY_AFTER = 3
STALE_AFTER = 3  # failed scrapes after which a worker's last figures are no longer trusted

_GAUGES = {
    "vllm:num_requests_running": "running",
    "vllm:num_requests_waiting": "waiting",
    "vllm:kv_cache_usage_perc": "kv_cache_usage",
    "vllm:gpu_cache_usage_perc": "kv_cache_usage",  # older vLLM
    "vllm:prompt_tokens_total": "prompt_tokens_total",
    "vllm:generation_tokens_total": "generation_tokens_total",
    "vllm:prefix_cache_hits_total": "prefix_hits",
    "vllm:prefix_cache_queries_total": "prefix_queries",
}


def parse_vllm_metrics(text: str) -> dict[str, float]:
    """The figures routing needs: summed over a worker's engines (data parallel), and the largest across model
    names (one engine may be served under several names: counting it once per name would double it)."""
    by_model: dict[str, dict[str, float]] = {}
    for line in text.splitlines():
        if not line.startswith("vllm:"):
            continue
        name_end = min((index for index in (line.find("{"), line.find(" ")) if index >= 0), default=-1)
        name = _GAUGES.get(line[:name_end])
        if name is None:
            continue
        try:
            value = float(line.rsplit(" ", 1)[1])
        except (IndexError, ValueError):
            continue
        label_start = line.find('model_name="')
        model = line[label_start + 12 : line.find('"', label_start + 12)] if label_start >= 0 else ""
        figures = by_model.setdefault(model, {})
        figures[name] = figures.get(name, 0.0) + value
    values: dict[str, float] = {}
    for figures in by_model.values():
        for name, value in figures.items():
            values[name] = max(values.get(name, value), value)
    return values


def apply_scrape(endpoint: Endpoint, values: dict[str, float]) -> None:
    endpoint.running = values.get("running")
    endpoint.waiting = values.get("waiting")
    endpoint.kv_cache_usage = values.get("kv_cache_usage")
    endpoint.prompt_tokens_total = values.get("prompt_tokens_total")
    endpoint.generation_tokens_total = values.get("generation_tokens_total")
    queries = values.get("prefix_queries")
    if queries:
        endpoint.prefix_cache_hit_rate = values.get("prefix_hits", 0.0) / queries
    endpoint.sent_since_scrape = 0
    endpoint.scraped_at = time.time()


def forget_figures(endpoint: Endpoint) -> None:
    """Old figures would keep an overloaded worker looking idle: route it on this process's own count instead."""
    endpoint.running = endpoint.waiting = endpoint.kv_cache_usage = None
    endpoint.sent_since_scrape = 0


class RouteMonitor:
    def __init__(self, routes: Callable[[], RouteTable], settings: Callable[[], Routing]) -> None:
        self._routes = routes
        self._settings = settings
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        self._session = aiohttp.ClientSession()
        await asyncio.to_thread(self.resolve_proxies)

    def resolve_proxies(self) -> None:
        from gateway.upstream.pool import proxy_for

        for endpoint in self._routes().endpoints():
            endpoint.proxy = proxy_for(endpoint.base_url)

    @staticmethod
    def _outbound(endpoint: Endpoint) -> dict[str, Any]:
        """The same proxy and certificates as the endpoint's requests."""
        from gateway.upstream.pool import ssl_context

        return {"ssl": ssl_context(endpoint.deployment), "proxy": endpoint.proxy}

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    def _vllm_endpoints(self) -> list[Endpoint]:
        return [endpoint for endpoint in self._routes().endpoints() if endpoint.deployment.config.kind == "vllm"]

    async def scrape_forever(self) -> None:
        while True:
            await asyncio.gather(*(self._scrape(endpoint) for endpoint in self._vllm_endpoints()))
            self._export()
            await asyncio.sleep(self._settings().scrape_interval)

    async def _scrape(self, endpoint: Endpoint) -> None:
        """One worker's figures, within the scrape timeout (a slow worker delays nobody else's)."""
        assert self._session is not None
        try:
            async with asyncio.timeout(self._settings().scrape_timeout):
                async with self._session.get(endpoint.root_url + "/metrics", **self._outbound(endpoint)) as response:
                    response.raise_for_status()
                    text = await response.text()
                apply_scrape(endpoint, await asyncio.to_thread(parse_vllm_metrics, text))
            endpoint.failed_scrapes = 0
        except (aiohttp.ClientError, TimeoutError):
            endpoint.failed_scrapes += 1
            if endpoint.failed_scrapes >= STALE_AFTER:
                forget_figures(endpoint)

    async def health_forever(self) -> None:
        while True:
            await asyncio.gather(*(self._check(endpoint) for endpoint in self._vllm_endpoints()))
            await asyncio.sleep(self._settings().health_interval)

    async def _check(self, endpoint: Endpoint) -> None:
        assert self._session is not None
        try:
            async with asyncio.timeout(self._settings().health_timeout):
                async with self._session.get(endpoint.root_url + "/health", **self._outbound(endpoint)) as response:
                    healthy = response.status == 200
        except (aiohttp.ClientError, TimeoutError):
            healthy = False
        if healthy:
            if not endpoint.healthy:
                log.info("endpoint %s is healthy again", endpoint.key)
                endpoint.breaker.success()
            endpoint.failed_checks = 0
            endpoint.healthy = True
            return
        endpoint.failed_checks += 1
        # One missed check (a busy machine, a slow answer) is not an outage: several in a row are.
        if endpoint.failed_checks >= UNHEALTHY_AFTER and endpoint.healthy:
            log.warning(
                "endpoint %s failed %d health checks in a row: out of rotation", endpoint.key, endpoint.failed_checks
            )
            endpoint.healthy = False

    def _export(self) -> None:
        for endpoint in self._routes().endpoints():
            metrics.ENDPOINT_LOAD.labels(endpoint.deployment.name, endpoint.base_url).set(expected_load(endpoint))
        for deployment in self._routes().deployments():
            states = [endpoint.breaker.state.value for endpoint in deployment.endpoints]
            worst = "open" if "open" in states else "half_open" if "half_open" in states else "closed"
            metrics.circuit_state(deployment.name, worst)
            metrics.DEPLOYMENT_OUTSTANDING.labels(deployment.name).set(deployment.outstanding)

    async def sample_forever(self, sql: SqlRunner, interval: float = 60.0) -> None:
        """Record each worker's token counters once a minute, for GPU chargeback by token share."""
        while True:
            await asyncio.sleep(interval)
            at = datetime.now(UTC).replace(second=0, microsecond=0)
            with contextlib.suppress(sa.exc.SQLAlchemyError):
                await sql.run(insert_samples, sql.engine, sample_rows(self._vllm_endpoints(), at))

    async def dns_forever(self) -> None:
        while True:
            routing = self._settings()
            for deployment in self._routes().deployments():
                url = deployment.config.dns_base_url
                if url is None:
                    continue
                with contextlib.suppress(OSError):
                    urls = await resolve_workers(url)
                    if urls:
                        deployment.set_urls(urls, (routing.breaker_threshold, routing.breaker_cooldown))
                        await asyncio.to_thread(self.resolve_proxies)
            await asyncio.sleep(routing.dns_interval)


def sample_rows(endpoints: list[Endpoint], at: datetime) -> list[dict[str, object]]:
    return [
        {
            "at": at,
            "deployment": endpoint.deployment.name,
            "endpoint": endpoint.base_url,
            "prompt_tokens_total": int(endpoint.prompt_tokens_total),
            "generation_tokens_total": int(endpoint.generation_tokens_total or 0),
        }
        for endpoint in endpoints
        if endpoint.prompt_tokens_total is not None
    ]


def insert_samples(engine: sa.Engine, rows: list[dict[str, object]]) -> None:
    """Every process scrapes the same workers: rows are per minute, and the first writer wins."""
    if not rows:
        return
    dialect = postgresql if engine.dialect.name == "postgresql" else sqlite
    with engine.begin() as connection:
        connection.execute(dialect.insert(worker_token_samples).on_conflict_do_nothing(), rows)


async def resolve_workers(url: str) -> list[str]:
    """One base URL per address the host name resolves to (for plain-HTTP worker pools, e.g. a headless Service)."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    infos = await asyncio.get_running_loop().getaddrinfo(parts.hostname, port, type=socket.SOCK_STREAM)
    addresses = sorted({info[4][0] for info in infos})
    path = parts.path.rstrip("/")
    return [
        f"{parts.scheme}://[{address}]:{port}{path}"
        if ":" in str(address)
        else f"{parts.scheme}://{address}:{port}{path}"
        for address in addresses
    ]
