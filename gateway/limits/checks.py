"""Turning a request's scopes into the list of checks a store admits atomically, and the Redis key layout.

Key layout (version `v1`; a gateway that changes the layout must change the version, because old and new
gateways share Redis during a rolling deploy):

    gw:v1:{t:<team id>}:rq:<bucket ms>:<scope>   hash    requests, sliding window
    gw:v1:{t:<team id>}:tk:<bucket ms>:<scope>   hash    tokens, sliding window
    gw:v1:{t:<team id>}:cc:<scope>               zset    concurrency leases (member request id, score expiry ms)
    gw:v1:{t:<team id>}:bt:<scope>:d<day>        string  tokens used today (day = days since 1970-01-01 UTC)
    gw:v1:{t:<team id>}:bc:<scope>:m<yyyymm>     string  nano-USD spent this month
    gw:v1:{t:<team id>}:init                     string  budgets of this slot were rebuilt from SQL
    gw:v1:{m:<model>}:...                        the same for organisation-wide model caps

<scope> is `team`, `user:<id>`, `key:<id>`, `tm:<model>` or `model`. The `{...}` hash tag keeps one team's keys
in one slot of a Redis Cluster, so a single script can check them all.
"""

from __future__ import annotations

import calendar
from dataclasses import dataclass
from datetime import UTC, datetime

from gateway.limits.policy import ScopeLimits

PREFIX = "gw:v1:"
DAY_MS = 86_400_000
_DAY_TTL_S = 3 * 86_400
_MONTH_GRACE_S = 3 * 86_400


@dataclass(frozen=True, slots=True)
class Periods:
    """The UTC day and month a request's budgets are charged to."""

    day_start: int
    day_end: int
    month_start: int
    month_end: int

    @classmethod
    def at(cls, now_ms: int) -> Periods:
        cached = _periods_cache[0]
        if cached is not None and cached.day_start <= now_ms < cached.day_end:
            return cached  # the same UTC day, so the same month: no calendar work per request
        periods = cls._compute(now_ms)
        _periods_cache[0] = periods
        return periods

    @classmethod
    def _compute(cls, now_ms: int) -> Periods:
        day_start = now_ms // DAY_MS * DAY_MS
        moment = datetime.fromtimestamp(now_ms / 1000, UTC)
        month_start = datetime(moment.year, moment.month, 1, tzinfo=UTC)
        days = calendar.monthrange(moment.year, moment.month)[1]
        month_end_ms = int(month_start.timestamp() * 1000) + days * DAY_MS
        return cls(day_start, day_start + DAY_MS, int(month_start.timestamp() * 1000), month_end_ms)

    @property
    def day_id(self) -> str:
        return f"d{self.day_start // DAY_MS}"

    @property
    def month_id(self) -> str:
        return _month_ids.get(self.month_start) or _month_id(self.month_start)

    def month_ttl_s(self, now_ms: int) -> int:
        return (self.month_end - now_ms) // 1000 + _MONTH_GRACE_S


_periods_cache: list[Periods | None] = [None]
_month_ids: dict[int, str] = {}


def _month_id(month_start_ms: int) -> str:
    moment = datetime.fromtimestamp(month_start_ms / 1000, UTC)
    text = _month_ids[month_start_ms] = f"m{moment.year:04d}{moment.month:02d}"
    return text


@dataclass(slots=True)  # not frozen: a frozen dataclass is several times slower to build, and six are built per request
class Check:
    kind: str  # sw: sliding window, cc: concurrency, bd/bm: daily/monthly budget, mk: budgets marker
    key: str
    limit: int
    amount: int
    p1: int
    p2: int
    tokens: bool  # the amount is a token count (clamping may lower it)
    scope: ScopeLimits | None
    metric: str  # requests, tokens, concurrency, daily_tokens, monthly_tokens, daily_cost, monthly_cost, marker


@dataclass(frozen=True, slots=True)
class Window:
    window_ms: int
    bucket_ms: int


def slot_of(key: str) -> str:
    """The hash slot tag of a limit key: `t:<team id>` or `m:<model>`."""
    return key.split("{", 1)[1].split("}", 1)[0]


def marker_key(slot: str) -> str:
    return f"{PREFIX}{{{slot}}}:init"


def budget_key(slot: str, label: str, what: str, period_id: str) -> str:
    return f"{PREFIX}{{{slot}}}:{what}:{label}:{period_id}"


_AMOUNT_OF = {
    "requests": "one",
    "concurrency": "one",
    "marker": "none",
    "tokens": "tokens",
    "daily_tokens": "tokens",
    "monthly_tokens": "tokens",
    "daily_cost": "cost",
    "monthly_cost": "cost",
}


def with_amounts(templates: list[Check], tokens: int, cost: int) -> list[Check]:
    """A request's checks from its scopes' templates (built once a day): only the amounts are its own."""
    amounts = {"one": 1, "none": 0, "tokens": tokens, "cost": cost}
    return [
        Check(t.kind, t.key, t.limit, amounts[_AMOUNT_OF[t.metric]], t.p1, t.p2, t.tokens, t.scope, t.metric)
        for t in templates
    ]


def build_checks(
    scopes: tuple[ScopeLimits, ...],
    *,
    tokens: int,
    cost_nanousd: int,
    window: Window,
    lease_ms: int,
    periods: Periods,
    now_ms: int,
    with_marker: bool,
) -> list[Check]:
    checks: list[Check] = []
    month_ttl = periods.month_ttl_s(now_ms)
    for scope in scopes:
        tag = f"{PREFIX}{{{scope.slot}}}:"
        if scope.rpm is not None:
            key = f"{tag}rq:{window.bucket_ms}:{scope.label}"
            checks.append(Check("sw", key, scope.rpm, 1, window.window_ms, window.bucket_ms, False, scope, "requests"))
        if scope.tpm is not None:
            key = f"{tag}tk:{window.bucket_ms}:{scope.label}"
            checks.append(
                Check("sw", key, scope.tpm, tokens, window.window_ms, window.bucket_ms, True, scope, "tokens")
            )
        if scope.concurrency is not None:
            key = f"{tag}cc:{scope.label}"
            checks.append(Check("cc", key, scope.concurrency, 1, lease_ms, 0, False, scope, "concurrency"))
        hard = 1 if scope.hard_budgets else 0
        budgets = (
            ("bd", scope.daily_tokens, "bt", periods.day_id, _DAY_TTL_S, tokens, True, "daily_tokens"),
            ("bm", scope.monthly_tokens, "bt", periods.month_id, month_ttl, tokens, True, "monthly_tokens"),
            ("bd", scope.daily_cost_nanousd, "bc", periods.day_id, _DAY_TTL_S, cost_nanousd, False, "daily_cost"),
            ("bm", scope.monthly_cost_nanousd, "bc", periods.month_id, month_ttl, cost_nanousd, False, "monthly_cost"),
        )
        for kind, limit, what, period_id, ttl, amount, is_tokens, metric in budgets:
            if limit is not None:
                key = budget_key(scope.slot, scope.label, what, period_id)
                checks.append(Check(kind, key, limit, amount, ttl, hard, is_tokens, scope, metric))
    if with_marker and checks and any(check.kind in ("bd", "bm") for check in checks):
        checks.insert(0, Check("mk", marker_key(scopes[0].slot), 0, 0, 0, 0, False, None, "marker"))
    return checks
