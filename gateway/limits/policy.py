"""Which limits apply to a request: config defaults per scope, overridden field by field from SQL.

Scopes: the key, its user, its team, the team's use of the requested model (team x model), and the
organisation-wide cap of the model. The first four share the team's Redis hash slot; the model cap has its own.
A user's limits apply within the team the key belongs to.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields

import sqlalchemy as sa

from gateway.auth.store import KeyRecord
from gateway.db.schema import limit_overrides
from gateway.metering.cost import usd_to_nano
from gateway.settings import Limits, LimitValues

UNLIMITED = -1


@dataclass(frozen=True, slots=True)
class Override:
    rpm: int | None = None
    tpm: int | None = None
    concurrency: int | None = None
    daily_tokens: int | None = None
    monthly_tokens: int | None = None
    daily_cost_nanousd: int | None = None
    monthly_cost_nanousd: int | None = None
    budget_mode: str | None = None


OverrideKey = tuple[str, str, str]  # (scope, scope_id, model)


def load_overrides(connection: sa.Connection) -> dict[OverrideKey, Override]:
    names = [field.name for field in fields(Override)]
    result: dict[OverrideKey, Override] = {}
    for row in connection.execute(sa.select(limit_overrides)).mappings():
        result[(row["scope"], row["scope_id"], row["model"])] = Override(**{name: row[name] for name in names})
    return result


@dataclass(frozen=True, slots=True)
class ScopeLimits:
    """The effective limits of one scope for one request. None: unlimited."""

    scope: str  # key, user, team, team_model, model
    subject: str  # what the scope is, for messages: a key prefix, a user or team name, a model
    label: str  # the Redis key part: "key:<id>", "user:<id>", "team", "tm:<model>", "model"
    slot: str  # the Redis hash tag: "t:<team id>" or "m:<model>"
    rpm: int | None
    tpm: int | None
    concurrency: int | None
    daily_tokens: int | None
    monthly_tokens: int | None
    daily_cost_nanousd: int | None
    monthly_cost_nanousd: int | None
    hard_budgets: bool

    @property
    def has_budgets(self) -> bool:
        return any(
            value is not None
            for value in (self.daily_tokens, self.monthly_tokens, self.daily_cost_nanousd, self.monthly_cost_nanousd)
        )

    @property
    def empty(self) -> bool:
        return self.rpm is None and self.tpm is None and self.concurrency is None and not self.has_budgets


def _pick(override: int | None, default: int | None) -> int | None:
    if override is None:
        return default
    return None if override == UNLIMITED else override


def _usd(value: object) -> int | None:
    return usd_to_nano(value) if value is not None else None  # type: ignore[arg-type]


def merge(
    default: LimitValues | None, override: Override | None, *, scope: str, subject: str, label: str, slot: str
) -> ScopeLimits | None:
    if default is None and override is None:
        return None
    base = default or LimitValues()
    over = override or Override()
    merged = ScopeLimits(
        scope=scope,
        subject=subject,
        label=label,
        slot=slot,
        rpm=_pick(over.rpm, base.rpm),
        tpm=_pick(over.tpm, base.tpm),
        concurrency=_pick(over.concurrency, base.concurrency),
        daily_tokens=_pick(over.daily_tokens, base.daily_tokens),
        monthly_tokens=_pick(over.monthly_tokens, base.monthly_tokens),
        daily_cost_nanousd=_pick(over.daily_cost_nanousd, _usd(base.daily_cost_usd)),
        monthly_cost_nanousd=_pick(over.monthly_cost_nanousd, _usd(base.monthly_cost_usd)),
        hard_budgets=(over.budget_mode or base.budget_mode) == "hard",
    )
    return None if merged.empty else merged


@dataclass(frozen=True, slots=True)
class RequestScopes:
    team_slot: tuple[ScopeLimits, ...]
    model_slot: tuple[ScopeLimits, ...]
    # The scope with the smallest token limit: a request bigger than it can never pass (checked per request).
    tightest_tpm: ScopeLimits | None = field(init=False, compare=False, default=None)

    def __post_init__(self) -> None:
        limited = [scope for scope in (*self.team_slot, *self.model_slot) if scope.tpm is not None]
        tightest = min(limited, key=lambda scope: scope.tpm or 0, default=None)
        object.__setattr__(self, "tightest_tpm", tightest)

    @property
    def empty(self) -> bool:
        return not self.team_slot and not self.model_slot


def resolve(limits: Limits, overrides: Mapping[OverrideKey, Override], key: KeyRecord, model: str) -> RequestScopes:
    team_tag = f"t:{key.team_id}"
    candidates = [
        merge(
            limits.key,
            overrides.get(("key", key.key_id, "")),
            scope="key",
            subject=key.display_prefix,
            label=f"key:{key.key_id}",
            slot=team_tag,
        ),
        merge(
            limits.user,
            overrides.get(("user", str(key.user_id), "")),
            scope="user",
            subject=key.user_name or "",
            label=f"user:{key.user_id}",
            slot=team_tag,
        )
        if key.user_id is not None
        else None,
        merge(
            limits.team,
            overrides.get(("team", str(key.team_id), "")),
            scope="team",
            subject=key.team_name,
            label="team",
            slot=team_tag,
        ),
        merge(
            limits.team_model.get(model) or limits.team_model.get("*"),
            overrides.get(("team_model", str(key.team_id), model)),
            scope="team_model",
            subject=f"{key.team_name}/{model}",
            label=f"tm:{model}",
            slot=team_tag,
        ),
    ]
    model_cap = merge(
        limits.model.get(model),
        overrides.get(("model", model, "")),
        scope="model",
        subject=model,
        label="model",
        slot=f"m:{model}",
    )
    return RequestScopes(
        team_slot=tuple(scope for scope in candidates if scope is not None),
        model_slot=(model_cap,) if model_cap is not None else (),
    )
