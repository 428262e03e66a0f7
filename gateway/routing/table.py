"""The route table built from the config: public names (models, aliases, groups) → deployments → endpoints.

A *deployment* is one way to serve a model with one price and one set of credentials: a pool of identical vLLM
workers, or a provider account. An *endpoint* is one address requests go to: one vLLM worker, or the provider's
API. Each endpoint carries what this process knows of its load and health; routing chooses among endpoints.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from gateway.breaker import BreakerState, CircuitBreaker
from gateway.errors import ModelNotFound
from gateway.settings import Deployment, Group, Model, Retry, Settings, Timeouts
from gateway.settings import Queue as QueueSettings


@dataclass(slots=True, eq=False)
class Endpoint:
    deployment: DeploymentRuntime
    base_url: str
    breaker: CircuitBreaker
    outstanding: int = 0  # this process's requests in flight here
    sent_since_scrape: int = 0  # sent after the last metrics scrape: not yet in the worker's own figures
    healthy: bool = True  # active health checks pass (false after several failures in a row)
    failed_checks: int = 0
    cooldown_until: float = 0.0  # monotonic: an upstream retry-after asked us to stay away until then
    drained: bool = False  # this one worker is being drained (admin call)
    proxy: str | None = None  # the outbound proxy for this endpoint (from HTTPS_PROXY/NO_PROXY), if any
    # vLLM's own figures, from /metrics (None until scraped, and for providers).
    running: float | None = None
    waiting: float | None = None
    kv_cache_usage: float | None = None
    prefix_cache_hit_rate: float | None = None
    prompt_tokens_total: float | None = None
    generation_tokens_total: float | None = None
    scraped_at: float = 0.0
    failed_scrapes: int = 0

    @property
    def key(self) -> str:
        return f"{self.deployment.name}@{self.base_url}"

    @property
    def root_url(self) -> str:
        """The server root, where vLLM serves /health and /metrics (base URLs end in /v1)."""
        return self.base_url.removesuffix("/v1")

    def available(self, now: float, *, panic: bool = False) -> bool:
        """Whether to send new work here. In panic mode (every endpoint of the model is failing its health checks)
        an unhealthy endpoint is tried anyway: a health check that times out on a starved machine must not turn
        into a certain 502 when the worker may well answer."""
        return (
            not self.deployment.draining
            and not self.drained
            and (self.healthy or panic)
            and now >= self.cooldown_until
            and self.breaker.state is not BreakerState.OPEN
        )


@dataclass(slots=True, eq=False)
class DeploymentRuntime:
    config: Deployment
    model: str  # the public name it serves
    timeouts: Timeouts
    upstream_model: str
    endpoints: list[Endpoint] = field(default_factory=list)
    drained_by_admin: bool = False
    in_flight: int = 0  # this process's requests, across endpoints

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def renames_model(self) -> bool:
        return self.upstream_model != self.model

    @property
    def draining(self) -> bool:
        return self.config.drain or self.drained_by_admin

    @property
    def outstanding(self) -> int:
        return sum(endpoint.outstanding for endpoint in self.endpoints)

    def set_urls(self, urls: list[str], breaker: tuple[int, float]) -> None:
        """Replace the endpoints (DNS re-resolution), keeping the state of those that stay."""
        current = {endpoint.base_url: endpoint for endpoint in self.endpoints}
        self.endpoints = [
            current.get(url) or Endpoint(self, url, CircuitBreaker(threshold=breaker[0], cooldown=breaker[1]))
            for url in urls
        ]


@dataclass(frozen=True, slots=True)
class ModelRoute:
    name: str
    deployments: tuple[DeploymentRuntime, ...]
    fallbacks: tuple[str, ...]
    affinity: str
    retry: Retry
    queue: QueueSettings
    created: int = 0

    def endpoints(self) -> list[Endpoint]:
        return [endpoint for deployment in self.deployments for endpoint in deployment.endpoints]


@dataclass(frozen=True, slots=True)
class GroupRoute:
    name: str
    group: Group
    created: int = 0


class RouteTable:
    def __init__(self, settings: Settings, *, created: int, previous: RouteTable | None = None) -> None:
        """`previous`: on a config reload, deployments whose settings did not change are carried over as they
        are, with their health, breakers, load figures and requests in flight."""
        self.created = created
        breaker = (settings.routing.breaker_threshold, settings.routing.breaker_cooldown)
        self._previous = {deployment.name: deployment for deployment in previous.deployments()} if previous else {}
        self.models: dict[str, ModelRoute] = {
            name: self._model_route(name, model, settings, breaker) for name, model in settings.models.items()
        }
        self._previous = {}
        self.groups = {name: GroupRoute(name, group, created) for name, group in settings.groups.items()}
        self.aliases = dict(settings.aliases)

    def _model_route(self, name: str, model: Model, settings: Settings, breaker: tuple[int, float]) -> ModelRoute:
        runtimes = []
        for deployment in model.deployments:
            kept = self._previous.get(deployment.name)
            if kept is not None and kept.config == deployment and kept.model == name:
                kept.timeouts = settings.deployment_timeouts(deployment)
                runtimes.append(kept)
                continue
            runtime = DeploymentRuntime(
                config=deployment,
                model=name,
                timeouts=settings.deployment_timeouts(deployment),
                upstream_model=deployment.served_model or name,
            )
            runtime.set_urls(deployment.static_urls, breaker)
            runtimes.append(runtime)
        return ModelRoute(
            name=name,
            deployments=tuple(runtimes),
            fallbacks=tuple(model.fallbacks),
            affinity=model.affinity,
            retry=model.retry,
            queue=model.queue,
            created=self.created,
        )

    def public_names(self) -> list[str]:
        return [*self.models, *self.groups, *self.aliases]

    def exists(self, name: str) -> bool:
        return name in self.models or name in self.groups or name in self.aliases

    def resolve(self, name: str) -> ModelRoute | GroupRoute:
        """The route for a public name (an alias resolves to its target)."""
        target = self.aliases.get(name, name)
        route = self.models.get(target) or self.groups.get(target)
        if route is None:
            raise ModelNotFound(f"The model '{name}' does not exist or you do not have access to it.", param="model")
        return route

    def deployments(self) -> list[DeploymentRuntime]:
        return [deployment for route in self.models.values() for deployment in route.deployments]

    def apply_drains(self, drains: frozenset[tuple[str, str]]) -> None:
        """Drains set through the admin API (shared through the snapshot): no new work, in-flight work finishes."""
        for deployment in self.deployments():
            deployment.drained_by_admin = (deployment.name, "") in drains
            for endpoint in deployment.endpoints:
                endpoint.drained = (deployment.name, endpoint.base_url) in drains

    def endpoints(self) -> list[Endpoint]:
        return [endpoint for route in self.models.values() for endpoint in route.endpoints()]


def dns_parts(url: str) -> tuple[str, int, str]:
    """(host, port, scheme) of a DNS-discovered deployment's URL."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return parts.hostname or "", port, parts.scheme


def monotonic() -> float:
    return time.monotonic()
