"""Every Prometheus object the gateway exports, in one place.

Label cardinality is bounded: model, team, status, deployment: never key or user ids. With several workers
the parent process sets PROMETHEUS_MULTIPROC_DIR before they start and `/metrics` aggregates across them.
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


def render() -> tuple[bytes, str]:
    if MULTIPROCESS:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(), CONTENT_TYPE_LATEST
