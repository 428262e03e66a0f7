"""Table definitions. Alembic migrations in `migrations/` are the only way these reach a database.

Conventions: money is integer nano-USD (1e-9 USD) in BigInteger columns; times are UTC; API keys are stored
only as an HMAC of the secret plus a public id.
"""

from __future__ import annotations

import sqlalchemy as sa

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

metadata = sa.MetaData(naming_convention=NAMING_CONVENTION)

UtcDateTime = sa.DateTime(timezone=True)

teams = sa.Table(
    "teams",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("name", sa.String(128), nullable=False, unique=True),
    sa.Column("disabled", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("created_at", UtcDateTime, nullable=False),
)

users = sa.Table(
    "users",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("name", sa.String(128), nullable=False, unique=True),
    sa.Column("email", sa.String(256), nullable=True),
    sa.Column("disabled", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("created_at", UtcDateTime, nullable=False),
)

api_keys = sa.Table(
    "api_keys",
    metadata,
    # The public half of the key: safe to log and show.
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("secret_hmac", sa.LargeBinary(32), nullable=False),
    sa.Column("name", sa.String(128), nullable=True),
    sa.Column("team_id", sa.Integer, sa.ForeignKey("teams.id"), nullable=False, index=True),
    sa.Column("user_id", sa.Integer, sa.ForeignKey("users.id"), nullable=True, index=True),
    sa.Column("allowed_models", sa.JSON, nullable=True),
    sa.Column("tags", sa.JSON, nullable=True),
    sa.Column("created_at", UtcDateTime, nullable=False),
    sa.Column("expires_at", UtcDateTime, nullable=True),
    sa.Column("revoked_at", UtcDateTime, nullable=True),
    sa.Column("last_used_at", UtcDateTime, nullable=True),
    # A team admin key may also manage its own team through the admin API and the dashboard (never other teams).
    sa.Column("team_admin", sa.Boolean, nullable=False, server_default=sa.false()),
)

prices = sa.Table(
    "prices",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("model", sa.String(128), nullable=False),
    # Empty string: the model's default price; otherwise the deployment it applies to.
    sa.Column("deployment", sa.String(128), nullable=False, server_default=""),
    sa.Column("effective_from", UtcDateTime, nullable=False),
    sa.Column("prompt_nanousd_per_mtok", sa.BigInteger, nullable=False),
    sa.Column("completion_nanousd_per_mtok", sa.BigInteger, nullable=False),
    sa.Column("cached_prompt_nanousd_per_mtok", sa.BigInteger, nullable=False),
    sa.Column("source", sa.String(32), nullable=False, server_default="config"),
    sa.UniqueConstraint("model", "deployment", "effective_from", name="uq_prices_model_deployment_from"),
)

# One row per admitted request. The primary key carries started_at so that PostgreSQL can partition the
# table by month (a partitioned table's unique keys must include the partition column).
usage = sa.Table(
    "usage",
    metadata,
    sa.Column("request_id", sa.Uuid, nullable=False),
    sa.Column("started_at", UtcDateTime, nullable=False),
    sa.Column("client_request_id", sa.String(128), nullable=True),
    sa.Column("endpoint", sa.String(32), nullable=False),
    sa.Column("key_id", sa.String(32), nullable=True),
    sa.Column("team_id", sa.Integer, nullable=True),
    sa.Column("user_id", sa.Integer, nullable=True),
    sa.Column("end_user", sa.String(256), nullable=True),
    sa.Column("model", sa.String(128), nullable=False),
    sa.Column("deployment", sa.String(128), nullable=True),
    sa.Column("upstream_model", sa.String(256), nullable=True),
    sa.Column("prompt_tokens", sa.Integer, nullable=False, server_default="0"),
    sa.Column("cached_prompt_tokens", sa.Integer, nullable=False, server_default="0"),
    sa.Column("completion_tokens", sa.Integer, nullable=False, server_default="0"),
    sa.Column("reasoning_tokens", sa.Integer, nullable=False, server_default="0"),
    sa.Column("usage_source", sa.String(16), nullable=False, server_default="none"),
    sa.Column("cost_nanousd", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("price_id", sa.Integer, nullable=True),
    sa.Column("status_code", sa.SmallInteger, nullable=False),
    sa.Column("error_type", sa.String(64), nullable=True),
    sa.Column("finish_reason", sa.String(32), nullable=True),
    sa.Column("streamed", sa.Boolean, nullable=False),
    sa.Column("client_disconnected", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("first_token_ms", sa.Float, nullable=True),
    sa.Column("duration_ms", sa.Float, nullable=False),
    sa.Column("tags", sa.JSON, nullable=True),
    sa.Column("first_token_at", UtcDateTime, nullable=True),
    sa.Column("ended_at", UtcDateTime, nullable=True),
    # Time spent waiting for a deployment slot (saturation queue), and in the upstream until its first token.
    sa.Column("queue_ms", sa.Float, nullable=True),
    sa.PrimaryKeyConstraint("request_id", "started_at", name="pk_usage"),
    sa.Index("ix_usage_team_started", "team_id", "started_at"),
    sa.Index("ix_usage_key_started", "key_id", "started_at"),
)

# A single row whose version every gateway process polls: any change to keys, teams, users or prices bumps it,
# and the processes reload their caches. Pub/sub would only be a hint; this is the guarantee.
cache_state = sa.Table(
    "cache_state",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("version", sa.BigInteger, nullable=False),
    sa.Column("updated_at", UtcDateTime, nullable=False),
)

# Per-scope limit overrides, changeable at run time (CLI, admin API). NULL: inherit the configured default;
# -1: explicitly unlimited. `scope` is one of key, user, team, team_model; `scope_id` the key id, user id or team
# id; `model` is set for team_model only ('' otherwise).
limit_overrides = sa.Table(
    "limit_overrides",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("scope", sa.String(16), nullable=False),
    sa.Column("scope_id", sa.String(64), nullable=False),
    sa.Column("model", sa.String(128), nullable=False, server_default=""),
    sa.Column("rpm", sa.BigInteger, nullable=True),
    sa.Column("tpm", sa.BigInteger, nullable=True),
    sa.Column("concurrency", sa.BigInteger, nullable=True),
    sa.Column("daily_tokens", sa.BigInteger, nullable=True),
    sa.Column("monthly_tokens", sa.BigInteger, nullable=True),
    sa.Column("daily_cost_nanousd", sa.BigInteger, nullable=True),
    sa.Column("monthly_cost_nanousd", sa.BigInteger, nullable=True),
    sa.Column("budget_mode", sa.String(8), nullable=True),
    sa.Column("updated_at", UtcDateTime, nullable=False),
    sa.UniqueConstraint("scope", "scope_id", "model", name="uq_limit_overrides_scope"),
)


_ROLLUP_SUMS = (
    "requests",
    "errors",
    "prompt_tokens",
    "cached_prompt_tokens",
    "completion_tokens",
    "reasoning_tokens",
    "cost_nanousd",
)


def _sums() -> list[sa.Column[int]]:
    return [sa.Column(name, sa.BigInteger, nullable=False, server_default="0") for name in _ROLLUP_SUMS]


# Rollups per hour and per day, kept current by the ledger writer from exactly the rows it inserted (so a replayed
# duplicate never counts twice), bucketed by request start. A month's report is a small query over these.
# Missing dimensions are stored as 0 / '' (primary-key columns cannot be NULL).
usage_rollups = sa.Table(
    "usage_rollups",
    metadata,
    sa.Column("granularity", sa.String(4), nullable=False),  # hour | day
    sa.Column("bucket_start", UtcDateTime, nullable=False),
    sa.Column("team_id", sa.Integer, nullable=False),
    sa.Column("user_id", sa.Integer, nullable=False),
    sa.Column("key_id", sa.String(32), nullable=False),
    sa.Column("model", sa.String(128), nullable=False),
    *_sums(),
    sa.PrimaryKeyConstraint(
        "granularity", "bucket_start", "team_id", "user_id", "key_id", "model", name="pk_usage_rollups"
    ),
    sa.Index("ix_usage_rollups_team", "team_id", "granularity", "bucket_start"),
)

usage_tag_rollups = sa.Table(
    "usage_tag_rollups",
    metadata,
    sa.Column("granularity", sa.String(4), nullable=False),
    sa.Column("bucket_start", UtcDateTime, nullable=False),
    sa.Column("team_id", sa.Integer, nullable=False),
    sa.Column("tag", sa.String(128), nullable=False),
    sa.Column("model", sa.String(128), nullable=False),
    *_sums(),
    sa.PrimaryKeyConstraint("granularity", "bucket_start", "team_id", "tag", "model", name="pk_usage_tag_rollups"),
)

ROLLUP_SUMS = _ROLLUP_SUMS


# --- administration (admin API, dashboard, alerts) -------------------------------------------------------

# Organisation admin keys created with `gateway admin-keys create`: the same format and HMAC as API keys
# (`sk-gwadm-<id>-<secret>`), never usable for model calls. Admin keys may also come from the config.
admin_keys = sa.Table(
    "admin_keys",
    metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("secret_hmac", sa.LargeBinary(32), nullable=False),
    sa.Column("name", sa.String(128), nullable=True),
    sa.Column("created_at", UtcDateTime, nullable=False),
    sa.Column("revoked_at", UtcDateTime, nullable=True),
    sa.Column("last_used_at", UtcDateTime, nullable=True),
)

# Every change made through the admin API or the dashboard: who, what, when, the state before and after. Written
# in the transaction of the change itself, so there is no change without its row. `team_id` scopes what a team
# admin may read.
audit_log = sa.Table(
    "audit_log",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("at", UtcDateTime, nullable=False),
    sa.Column("actor", sa.String(200), nullable=False),
    sa.Column("role", sa.String(16), nullable=False),
    sa.Column("team_id", sa.Integer, nullable=True),
    sa.Column("action", sa.String(64), nullable=False),
    sa.Column("target", sa.String(256), nullable=False),
    sa.Column("before", sa.JSON, nullable=True),
    sa.Column("after", sa.JSON, nullable=True),
    sa.Column("request_id", sa.String(64), nullable=True),
    sa.Index("ix_audit_log_at", "at"),
    sa.Index("ix_audit_log_team_at", "team_id", "at"),
)

# Budget threshold alerts, at most one row per (scope, threshold, period): the unique key is how several gateway
# processes agree that only one of them sends it. The row is also the webhook's outbox (status, attempts, next
# attempt), so a process that dies mid-delivery leaves it for another to retry.
budget_alerts = sa.Table(
    "budget_alerts",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("scope", sa.String(16), nullable=False),
    sa.Column("scope_id", sa.String(64), nullable=False),
    sa.Column("team_id", sa.Integer, nullable=True),
    sa.Column("metric", sa.String(32), nullable=False),
    sa.Column("period", sa.String(16), nullable=False),
    sa.Column("threshold", sa.Integer, nullable=False),
    sa.Column("used", sa.BigInteger, nullable=False),
    sa.Column("limit", sa.BigInteger, nullable=False),
    sa.Column("created_at", UtcDateTime, nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("next_attempt_at", UtcDateTime, nullable=True),
    sa.Column("delivered_at", UtcDateTime, nullable=True),
    sa.Column("last_error", sa.String(256), nullable=True),
    sa.UniqueConstraint("scope", "scope_id", "metric", "period", "threshold", name="uq_budget_alerts_once"),
    sa.Index("ix_budget_alerts_team_created", "team_id", "created_at"),
    sa.Index("ix_budget_alerts_status_next", "status", "next_attempt_at"),
)

# Drained deployments or single workers (endpoint '' = the whole deployment), set through the admin API: every
# gateway process sees them through the shared cache version, takes no new requests there, and lets in-flight
# streams finish.
deployment_drains = sa.Table(
    "deployment_drains",
    metadata,
    sa.Column("deployment", sa.String(128), nullable=False),
    sa.Column("endpoint", sa.String(512), nullable=False, server_default=""),
    sa.Column("drained_at", UtcDateTime, nullable=False),
    sa.Column("actor", sa.String(200), nullable=True),
    sa.PrimaryKeyConstraint("deployment", "endpoint", name="pk_deployment_drains"),
)

# Samples of each vLLM worker's own token counters (scraped from its /metrics), for GPU chargeback: a worker's
# GPU-hours are split across teams by their share of the tokens it processed (under continuous batching a
# request's wall time is not its share of the GPU).
worker_token_samples = sa.Table(
    "worker_token_samples",
    metadata,
    sa.Column("at", UtcDateTime, nullable=False),
    sa.Column("deployment", sa.String(128), nullable=False),
    sa.Column("endpoint", sa.String(512), nullable=False),
    sa.Column("prompt_tokens_total", sa.BigInteger, nullable=False),
    sa.Column("generation_tokens_total", sa.BigInteger, nullable=False),
    sa.PrimaryKeyConstraint("at", "deployment", "endpoint", name="pk_worker_token_samples"),
)
