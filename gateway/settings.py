"""Typed configuration: one YAML file, `${ENV}` substitution, validated once at start-up.

Two steps: `load_settings` turns text into a raw mapping (YAML + environment substitution), then pydantic
validates it into frozen objects. A bad file stops start-up with `SettingsError`, whose message names the
field path and what is wrong with it.
"""

from __future__ import annotations

import os
import re
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

_ENV_PATTERN = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")

DEFAULT_CONFIG_PATH = "config/embedded.yaml"


class SettingsError(Exception):
    """The configuration cannot be used; the message is meant for the operator."""


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def _usd(value: Any) -> Any:
    # YAML hands us floats; their shortest repr is what the operator typed, so go through str.
    if isinstance(value, float):
        return Decimal(repr(value))
    return value


UsdPerMillion = Annotated[Decimal, Field(ge=0, max_digits=18, decimal_places=9)]


class Price(_Frozen):
    """USD per one million tokens."""

    prompt: UsdPerMillion
    completion: UsdPerMillion
    cached_prompt: UsdPerMillion | None = None

    @field_validator("prompt", "completion", "cached_prompt", mode="before")
    @classmethod
    def _coerce(cls, value: Any) -> Any:
        return _usd(value)


class Timeouts(_Frozen):
    connect: float = Field(5.0, gt=0, description="TCP connect, and the wait for a pooled connection")
    first_byte: float = Field(
        600.0, gt=0, description="request sent → response headers (and whole body for non-streaming replies)"
    )
    idle: float = Field(120.0, gt=0, description="longest gap between two stream chunks")


class Deployment(_Frozen):
    """One way to serve a model: a pool of identical vLLM workers, or a provider account."""

    name: str = Field(min_length=1)
    kind: Literal["vllm", "openai", "azure"] = "vllm"
    base_url: str | None = Field(None, pattern=r"^https?://", description="one worker or the provider's API")
    base_urls: list[str] = Field(default_factory=list, description="several identical vLLM workers")
    dns_base_url: str | None = Field(
        None, pattern=r"^https?://", description="a URL whose host name resolves to every worker (re-resolved)"
    )
    api_key_env: str | None = None
    served_model: str | None = None
    headers: dict[str, str] = Field(default_factory=dict, description="extra headers sent upstream")
    api_version: str | None = Field(None, description="Azure OpenAI api-version")
    weight: float = Field(1.0, gt=0)
    max_concurrency: int | None = Field(None, ge=1, description="in flight across all gateway processes")
    pool_size: int = Field(100, ge=1, le=10_000)
    timeouts: Timeouts | None = None
    price: Price | None = None
    ca_bundle: str | None = Field(None, description="PEM file of CAs to trust instead of the system's")
    client_cert: str | None = Field(None, description="PEM certificate for mTLS")
    client_key: str | None = None
    drain: bool = Field(False, description="take no new requests; in-flight ones finish")

    @field_validator("base_url", "dns_base_url")
    @classmethod
    def _strip_slash(cls, value: str | None) -> str | None:
        return value.rstrip("/") if value else value

    @field_validator("base_urls")
    @classmethod
    def _check_urls(cls, values: list[str]) -> list[str]:
        for value in values:
            if not value.startswith(("http://", "https://")):
                raise ValueError(f"{value!r} is not an http(s) URL")
        return [value.rstrip("/") for value in values]

    @model_validator(mode="after")
    def _one_source(self) -> Deployment:
        sources = sum(1 for source in (self.base_url, self.base_urls, self.dns_base_url) if source)
        if sources != 1:
            raise ValueError("give exactly one of base_url, base_urls, dns_base_url")
        if self.kind == "azure" and not self.api_version:
            raise ValueError("azure deployments need api_version")
        if self.client_key and not self.client_cert:
            raise ValueError("client_key needs client_cert")
        return self

    @property
    def static_urls(self) -> list[str]:
        return [self.base_url] if self.base_url else list(self.base_urls)


class Retry(_Frozen):
    attempts: int = Field(3, ge=1, le=10, description="tries across deployments, before fallbacks")
    deadline: float = Field(60.0, gt=0, description="no new attempt starts after this many seconds")


class Queue(_Frozen):
    max_waiting: int = Field(256, ge=0, description="requests waiting for a deployment slot, per model")
    timeout: float = Field(30.0, gt=0, description="longest wait for a slot; then 429 with retry-after")


class Model(_Frozen):
    deployments: list[Deployment] = Field(min_length=1)
    price: Price | None = None
    fallbacks: list[str] = Field(default_factory=list, description="models tried when every deployment failed")
    affinity: Literal["none", "user", "prefix"] = Field("none", description="keep related requests on one worker")
    retry: Retry = Retry()
    queue: Queue = Queue()


class Group(_Frozen):
    """A public name served by several models: the cheapest healthy one, or the least loaded."""

    models: list[str] = Field(min_length=1)
    strategy: Literal["cheapest", "least_loaded"] = "cheapest"


class Routing(_Frozen):
    scrape_interval: float = Field(1.0, gt=0, description="vLLM /metrics scrape period")
    scrape_timeout: float = Field(2.0, gt=0, description="longest wait for one worker's /metrics")
    health_interval: float = Field(5.0, gt=0, description="active /health check period")
    health_timeout: float = Field(5.0, gt=0, description="longest wait for one /health answer")
    dns_interval: float = Field(30.0, gt=0)
    breaker_threshold: int = Field(3, ge=1, description="consecutive failures that open a deployment's breaker")
    breaker_cooldown: float = Field(5.0, gt=0, description="seconds before a half-open probe")
    team_priorities: dict[str, int] = Field(default_factory=dict, description="queue priority per team name")


class Listen(_Frozen):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)


class Database(_Frozen):
    url: str = "sqlite:///data/gateway.db"
    pool_size: int = Field(5, ge=1)


class Redis(_Frozen):
    url: str | None = None
    fail_open: bool = False
    timeout: float = Field(0.25, gt=0)

    @field_validator("url")
    @classmethod
    def _empty_is_none(cls, value: str | None) -> str | None:
        return value or None


class Auth(_Frozen):
    pepper: str | None = Field(None, description="HMAC pepper for API keys (from the environment)")
    pepper_file: str | None = Field(None, description="created with a random pepper if missing (embedded mode)")
    cache_poll_interval: float = Field(0.25, gt=0, le=5)

    @model_validator(mode="after")
    def _pepper_source(self) -> Auth:
        if not self.pepper and not self.pepper_file:
            raise ValueError("set auth.pepper (e.g. ${GATEWAY_KEY_PEPPER}) or auth.pepper_file")
        if self.pepper and len(self.pepper) < 16:
            raise ValueError("auth.pepper must be at least 16 characters")
        return self


class Server(_Frozen):
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024)
    workers: int = Field(1, ge=1, le=256)
    shutdown_grace: float = Field(30.0, ge=0)
    backlog: int = Field(2048, ge=16)
    keepalive_timeout: float = Field(75.0, ge=0)


class LimitValues(_Frozen):
    """Limits of one scope. None: no limit from this level (an SQL override may still set one)."""

    rpm: int | None = Field(None, ge=0, description="requests per window")
    tpm: int | None = Field(None, ge=0, description="prompt + completion tokens per window")
    concurrency: int | None = Field(None, ge=0, description="requests in flight")
    daily_tokens: int | None = Field(None, ge=0)
    monthly_tokens: int | None = Field(None, ge=0)
    daily_cost_usd: Decimal | None = Field(None, ge=0, decimal_places=9)
    monthly_cost_usd: Decimal | None = Field(None, ge=0, decimal_places=9)
    budget_mode: Literal["hard", "soft"] = "hard"

    @field_validator("daily_cost_usd", "monthly_cost_usd", mode="before")
    @classmethod
    def _coerce(cls, value: Any) -> Any:
        return _usd(value)


class Limits(_Frozen):
    window_seconds: float = Field(60.0, gt=0, description="W of the per-minute limits (shorter in tests)")
    buckets_per_window: int = Field(30, ge=2, le=600, description="sliding-window resolution")
    default_max_tokens: int = Field(1024, ge=1, description="reserved for a request that sends no max_tokens")
    clamp_max_tokens: bool = Field(False, description="set max_tokens to what the scopes still allow")
    lease_seconds: float = Field(60.0, ge=1, description="concurrency lease; renewed by the heartbeat")
    local_grants: bool = Field(
        True,
        description="with Redis: a worker reserves room for its next few requests ahead (at most 1/16 of what a "
        "limit has left, for at most 2 s) and admits them without a round trip; false: every request asks Redis",
    )
    overlap_admission: bool = Field(
        True,
        description="send a request to a vllm deployment while Redis admits it, when its key's last admission "
        "(within the last minute) left at least a quarter of every limit: the admission's round trip overlaps the "
        "upstream's work instead of preceding it; a refusal cancels the upstream request before the client gets a "
        "byte (a prefill thrown away). Requests to openai/azure deployments, which may bill a cancelled request, "
        "always wait for admission",
    )
    prompt_estimate: Literal["cl100k-32k", "cl100k", "bytes"] = Field(
        "cl100k-32k",
        description="how the gateway counts prompt tokens (reservations, hang-ups before the usage chunk): "
        "cl100k-32k, the bundled BPE's first 32,768 merges (never below full cl100k, ~4-8% above; ~11 MB per "
        "worker), cl100k, the whole BPE (~23 MB per worker), or bytes, a heuristic that over-counts (~2 bytes per "
        "token); read at start-up",
    )
    key: LimitValues | None = None
    user: LimitValues | None = None
    team: LimitValues | None = None
    # Per team and model: the same limits applied to each team's use of that model ("*": any model).
    team_model: dict[str, LimitValues] = Field(default_factory=dict)
    # Organisation-wide caps per model, shared by every team.
    model: dict[str, LimitValues] = Field(default_factory=dict)

    @property
    def configured(self) -> bool:
        return any(value is not None for value in (self.key, self.user, self.team)) or bool(
            self.team_model or self.model
        )


class Metering(_Frozen):
    enabled: bool = Field(
        True, description="false: no usage records at all (benchmarks, dry runs); never where anyone is billed"
    )
    flush_interval: float = Field(0.5, gt=0)
    batch_size: int = Field(500, ge=1, le=50_000)
    batch_gap: float = Field(
        0.2, ge=0, le=10, description="the writer's pause after a partial batch: fewer, larger transactions"
    )
    spool_dir: str = Field("data/spool", description="local durable buffer (one locked sub-directory per process)")
    spool_fsync: bool = Field(True, description="fsync spool appends (group commit) before answering")
    max_backlog: int = Field(1_000_000, ge=1, description="stream entries past which new requests get 503")
    max_spool_bytes: int = Field(1 << 30, ge=1024, description="spool size past which new requests get 503")
    claim_idle: float = Field(30.0, gt=0, description="seconds before a dead process's stream entries are claimed")


class Admin(_Frozen):
    """Organisation admin keys given in the config (usually `${GATEWAY_ADMIN_KEY}`); more can be created with
    `gateway admin-keys create`. Empty entries (an unset variable with an empty default) are ignored."""

    keys: list[str] = Field(default_factory=list)

    @field_validator("keys")
    @classmethod
    def _strong(cls, value: list[str]) -> list[str]:
        keys = [key.strip() for key in value if key and key.strip()]
        for key in keys:
            if len(key) < 24:
                raise ValueError("admin keys must be at least 24 characters long")
        return keys


class Dashboard(_Frozen):
    session_hours: float = Field(8.0, gt=0, le=24 * 30, description="lifetime of a dashboard sign-in")
    # Opt-in SSO: a reverse proxy that authenticates people passes their identity in this header. It is trusted
    # only from `trusted_proxies`; identities map to roles below. Unset: the header is ignored.
    trusted_identity_header: str | None = None
    trusted_proxies: list[str] = Field(default_factory=lambda: ["127.0.0.1", "::1"])
    sso_org_admins: list[str] = Field(default_factory=list)
    sso_team_admins: dict[str, list[str]] = Field(default_factory=dict, description="team name -> identities")
    secure_cookie: bool | None = Field(None, description="Secure cookie flag; None: when the request is https")


class Alerts(_Frozen):
    """Budget threshold alerts: a webhook POST, HMAC-SHA-256 signed, retried with back-off."""

    enabled: bool = True
    webhook_url: str | None = Field(None, pattern=r"^https?://")
    secret: str | None = Field(None, description="HMAC key of the X-Gateway-Signature header")
    thresholds: list[int] = Field(default_factory=lambda: [50, 80, 100])
    interval: float = Field(30.0, gt=0, description="seconds between budget checks")
    max_attempts: int = Field(8, ge=1, le=100)
    timeout: float = Field(5.0, gt=0)
    backoff: float = Field(2.0, gt=0, description="first retry delay; doubles per attempt")

    @field_validator("webhook_url", "secret", mode="before")
    @classmethod
    def _empty_is_none(cls, value: str | None) -> str | None:
        return value or None

    @field_validator("thresholds")
    @classmethod
    def _percentages(cls, value: list[int]) -> list[int]:
        if any(not 0 < threshold <= 1000 for threshold in value):
            raise ValueError("thresholds are percentages between 1 and 1000")
        return sorted(set(value))


class Logging(_Frozen):
    access_log: bool = Field(True, description="one JSON line per request on the gateway.access logger")
    log_prompts: bool = Field(False, description="opt-in: include request messages and completions in it")


class MetricsSettings(_Frozen):
    key_labels: bool = Field(False, description="also export per-key and per-user series (unbounded cardinality)")


class Settings(_Frozen):
    listen: Listen = Listen()
    database: Database = Database()
    redis: Redis = Redis()
    auth: Auth
    server: Server = Server()
    timeouts: Timeouts = Timeouts()
    metering: Metering = Metering()
    limits: Limits = Limits()
    admin: Admin = Admin()
    dashboard: Dashboard = Dashboard()
    alerts: Alerts = Alerts()
    logging: Logging = Logging()
    metrics: MetricsSettings = MetricsSettings()
    routing: Routing = Routing()
    models: dict[str, Model] = Field(min_length=1)
    aliases: dict[str, str] = Field(default_factory=dict, description="another public name for a model or group")
    groups: dict[str, Group] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _consistent_names(self) -> Settings:
        seen: set[str] = set()
        for model_name, model in self.models.items():
            for deployment in model.deployments:
                if deployment.name in seen:
                    raise ValueError(f"models.{model_name}: deployment name {deployment.name!r} is used twice")
                seen.add(deployment.name)
            for fallback in model.fallbacks:
                if fallback not in self.models or fallback == model_name:
                    raise ValueError(f"models.{model_name}.fallbacks: {fallback!r} is not another configured model")
        for name, group in self.groups.items():
            if name in self.models:
                raise ValueError(f"groups.{name}: the name is already a model")
            for member in group.models:
                if member not in self.models:
                    raise ValueError(f"groups.{name}: {member!r} is not a configured model")
        for alias, target in self.aliases.items():
            if alias in self.models or alias in self.groups:
                raise ValueError(f"aliases.{alias}: the name is already a model or group")
            if target not in self.models and target not in self.groups:
                raise ValueError(f"aliases.{alias}: {target!r} is not a configured model or group")
        return self

    def deployment_timeouts(self, deployment: Deployment) -> Timeouts:
        return deployment.timeouts or self.timeouts


def substitute_env(text: str, environ: dict[str, str] | os._Environ[str] = os.environ) -> str:
    """Replace `${NAME}` and `${NAME:-default}`; an unset variable without a default is an error."""

    def replace(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        value = environ.get(name)
        if value is not None and value != "":
            return value
        if default is not None:
            return default
        raise SettingsError(f"environment variable {name} is not set (referenced as ${{{name}}})")

    return _ENV_PATTERN.sub(replace, text)


def _describe(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        path = ".".join(str(part) for part in item["loc"]) or "(top level)"
        lines.append(f"  {path}: {item['msg']}")
    return "invalid configuration:\n" + "\n".join(lines)


def parse_settings(raw: dict[str, Any]) -> Settings:
    try:
        return Settings.model_validate(raw)
    except ValidationError as exc:
        raise SettingsError(_describe(exc)) from None


def _substitute_tree(value: Any) -> Any:
    # Substituting after parsing keeps `${...}` in comments inert and values from breaking YAML syntax.
    if isinstance(value, str):
        return substitute_env(value)
    if isinstance(value, dict):
        return {key: _substitute_tree(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_substitute_tree(item) for item in value]
    return value


def load_settings(path: str | Path | None = None) -> Settings:
    path = Path(path or os.environ.get("GATEWAY_CONFIG") or DEFAULT_CONFIG_PATH)
    try:
        text = path.read_text()
    except OSError as exc:
        raise SettingsError(f"cannot read configuration file {path}: {exc.strerror}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SettingsError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise SettingsError(f"{path}: the top level must be a mapping")
    return parse_settings(_substitute_tree(raw))
