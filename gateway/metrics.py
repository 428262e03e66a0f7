"""Every Prometheus object the gateway exports, in one place.

Label cardinality is bounded: model, team, status, deployment: never key or user ids, unless the operator turns
on `metrics.key_labels` (then the `gateway_key_*` series carry the key prefix and user). With several workers
the parent process sets PROMETHEUS_MULTIPROC_DIR before they start and `/metrics` aggregates across them (gauges
say how: livesum, livemax, ...).
"""

from __future__ import annotations

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

MULTIPROCESS = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

REQUESTS = Counter("gateway_requests_total", "Requests answered", ["endpoint", "model", "team", "status"])
REQUEST_SECONDS = Histogram(
    "gateway_request_duration_seconds",
    "Whole request duration",
    ["endpoint", "model"],
    buckets=_LATENCY_BUCKETS,
)
FIRST_TOKEN_SECONDS = Histogram(
    "gateway_time_to_first_token_seconds", "Time to the first token", ["model"], buckets=_LATENCY_BUCKETS
)
TOKENS = Counter("gateway_tokens_total", "Tokens metered", ["model", "team", "kind"])
COST = Counter("gateway_cost_nanousd_total", "Cost metered, nano-USD", ["model", "team"])
RATE_LIMITED = Counter("gateway_rate_limited_total", "Requests refused by a limit or budget", ["scope", "limit"])
BUDGET_SOFT_EXCEEDED = Counter(
    "gateway_budget_soft_exceeded_total", "Requests admitted over a soft budget", ["scope", "limit"]
)
LIMITER_STORE_ERRORS = Counter("gateway_limiter_store_errors_total", "Limit store (Redis) calls that failed")
LIMITER_FAIL_OPEN = Counter("gateway_limiter_fail_open_total", "Requests admitted unchecked while Redis was down")
LIMIT_ADMISSIONS = Counter(
    "gateway_limit_admissions_total",
    "Requests admitted by the limiter, by where: worker (all from local grants), partial (some checks from grants, "
    "the rest in Redis), store (all in Redis)",
    ["where"],
)
GRANT_RENEWALS = Counter(
    "gateway_limit_grant_renewals_total",
    "Scopes whose local grants were renewed as a period began, by outcome (refused: no room left for a grant; "
    "unavailable: Redis did not answer, the scope's next request asks it instead)",
    ["outcome"],
)
ADMISSION_OVERLAPS = Counter(
    "gateway_admission_overlaps_total",
    "Requests sent upstream while Redis admitted them, by outcome (refused: upstream work thrown away)",
    ["outcome"],
)
LIMITER_SETTLE_LOST = Counter("gateway_limiter_settle_lost_total", "Settlements that could not reach the store")
IN_FLIGHT = Gauge("gateway_in_flight_requests", "Requests being served", multiprocess_mode="livesum")
USAGE_BACKLOG = Gauge(
    "gateway_usage_backlog", "Usage records in the Redis stream waiting for the database", multiprocess_mode="livemax"
)
USAGE_SPOOL_BYTES = Gauge(
    "gateway_usage_spool_bytes",
    "Usage records in local spool files waiting for the database",
    multiprocess_mode="livesum",
)
USAGE_SPOOLED = Counter("gateway_usage_spooled_total", "Usage records written to the local spool")
LEDGER_ROWS = Counter("gateway_ledger_rows_total", "Usage rows inserted into the SQL ledger")
LEDGER_BATCH_SECONDS = Histogram("gateway_ledger_batch_seconds", "Time to insert one batch into the ledger")
REDIS_UP = Gauge("gateway_redis_up", "1 if the last Redis probe succeeded", multiprocess_mode="livemin")
DATABASE_UP = Gauge("gateway_database_up", "1 if the last database operation succeeded", multiprocess_mode="livemin")

# Where a request's time goes: in the upstream (request sent → last byte) and in the gateway itself (the rest).
UPSTREAM_SECONDS = Histogram(
    "gateway_upstream_duration_seconds",
    "Time spent in the upstream, request sent to last byte",
    ["deployment", "model"],
    buckets=_LATENCY_BUCKETS,
)
OVERHEAD_SECONDS = Histogram(
    "gateway_overhead_seconds",
    "The gateway's own time per request: whole duration minus upstream time",
    ["endpoint"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1),
)
STREAMS_IN_FLIGHT = Gauge("gateway_in_flight_streams", "Streaming responses being relayed", multiprocess_mode="livesum")
UPSTREAM_ERRORS = Counter("gateway_upstream_errors_total", "Upstream failures by deployment", ["deployment", "kind"])
UPSTREAM_ERROR_KINDS = ("timeout", "unreachable", "status", "stream")
CIRCUIT_STATE = Gauge(
    "gateway_circuit_state",
    "Circuit breaker per deployment: 0 closed, 1 half-open, 2 open (the worst across workers)",
    ["deployment"],
    multiprocess_mode="livemax",
)
CIRCUIT_VALUES = {"closed": 0, "half_open": 1, "open": 2}
WORKERS = Gauge("gateway_workers", "Worker processes serving", multiprocess_mode="livesum")
DEPLOYMENT_OUTSTANDING = Gauge(
    "gateway_deployment_outstanding",
    "Requests in flight per deployment (its saturation)",
    ["deployment"],
    multiprocess_mode="livesum",
)

# Administration.
ADMIN_REQUESTS = Counter("gateway_admin_requests_total", "Admin API calls", ["operation", "status"])
BUDGET_ALERTS = Counter(
    "gateway_budget_alerts_total",
    "Budget thresholds crossed (one per threshold and period)",
    ["scope", "metric", "threshold"],
)
ALERT_DELIVERIES = Counter("gateway_alert_deliveries_total", "Budget alert webhook attempts", ["result"])

# Opt-in (metrics.key_labels): per key and user. Unbounded cardinality, so off by default.
KEY_REQUESTS = Counter("gateway_key_requests_total", "Requests per key (opt-in)", ["key", "user", "team", "status"])
KEY_TOKENS = Counter("gateway_key_tokens_total", "Tokens per key (opt-in)", ["key", "user", "team", "kind"])
KEY_COST = Counter("gateway_key_cost_nanousd_total", "Cost per key, nano-USD (opt-in)", ["key", "user", "team"])
_key_labels = False


def configure(*, key_labels: bool, deployments: list[tuple[str, str]], endpoints: tuple[str, ...] = ()) -> None:
    """At worker start: whether per-key series are on, and zero-valued series for every (deployment, model) and
    endpoint, so that dashboards and alert rules see each of them (and `rate()` works) before its first event."""
    global _key_labels
    _key_labels = key_labels
    STREAMS_IN_FLIGHT.set(0)
    for deployment, model in deployments:
        CIRCUIT_STATE.labels(deployment).set(0)
        DEPLOYMENT_OUTSTANDING.labels(deployment).set(0)
        UPSTREAM_SECONDS.labels(deployment, model)
        for kind in UPSTREAM_ERROR_KINDS:
            UPSTREAM_ERRORS.labels(deployment, kind)
    for endpoint in endpoints:
        OVERHEAD_SECONDS.labels(endpoint)


def observe_upstream(
    endpoint: str, model: str, deployment: str | None, *, upstream_s: float | None, total_s: float
) -> None:
    """Split a finished request's duration into upstream time and the gateway's own overhead."""
    if deployment is None or upstream_s is None:
        return
    UPSTREAM_SECONDS.labels(deployment, model).observe(upstream_s)
    OVERHEAD_SECONDS.labels(endpoint).observe(max(total_s - upstream_s, 0.0))


def upstream_error(deployment: str, kind: str) -> None:
    """kind: timeout, unreachable, status (an error answer), stream (failed mid-stream)."""
    UPSTREAM_ERRORS.labels(deployment, kind).inc()


def circuit_state(deployment: str, state: str) -> None:
    """state: closed, half_open or open (`gateway.breaker.BreakerState.value`)."""
    CIRCUIT_STATE.labels(deployment).set(CIRCUIT_VALUES[state])


def observe_key(
    key_prefix: str, user: str | None, team: str, status: int, prompt: int, completion: int, cost: int
) -> None:
    """Per-key series, only when the operator turned them on."""
    if not _key_labels:
        return
    user_label = user or ""
    KEY_REQUESTS.labels(key_prefix, user_label, team, str(status)).inc()
    if prompt:
        KEY_TOKENS.labels(key_prefix, user_label, team, "prompt").inc(prompt)
    if completion:
        KEY_TOKENS.labels(key_prefix, user_label, team, "completion").inc(completion)
    if cost:
        KEY_COST.labels(key_prefix, user_label, team).inc(cost)


def render() -> tuple[bytes, str]:
    if MULTIPROCESS:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(), CONTENT_TYPE_LATEST


QUEUE_SECONDS = Histogram(
    "gateway_queue_seconds", "Time requests waited for a deployment slot", ["model"], buckets=_LATENCY_BUCKETS
)
QUEUE_REJECTED = Counter(
    "gateway_queue_rejected_total", "Requests refused because the wait queue was full or too long", ["model"]
)
QUEUE_DEPTH = Gauge(
    "gateway_queue_depth", "Requests waiting for a deployment slot", ["model"], multiprocess_mode="livesum"
)
ENDPOINT_LOAD = Gauge(
    "gateway_endpoint_expected_load",
    "The routing score of each endpoint (lower is chosen)",
    ["deployment", "endpoint"],
    multiprocess_mode="livemax",
)
