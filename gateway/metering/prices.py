"""Effective-dated prices in SQL. The config seeds them; SQL is the source of truth, history is never rewritten."""

from __future__ import annotations

import bisect
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime

import sqlalchemy as sa

from gateway.db.engine import as_utc, utcnow
from gateway.db.schema import prices
from gateway.metering.cost import Price, usd_to_nano
from gateway.routing.table import ModelRoute
from gateway.settings import Price as PriceSetting
from gateway.settings import Settings

MODEL_DEFAULT = ""  # the `deployment` column's value for a model-wide price


@dataclass(slots=True)
class PriceHistory:
    """Price rows of one (model, deployment), oldest first."""

    starts: list[float] = field(default_factory=list)
    prices: list[Price] = field(default_factory=list)

    def at(self, when: float) -> Price | None:
        index = bisect.bisect_right(self.starts, when) - 1
        return self.prices[index] if index >= 0 else None


@dataclass(frozen=True, slots=True)
class PriceBook:
    histories: Mapping[tuple[str, str], PriceHistory]

    def lookup(self, model: str, deployment: str | None, when: float) -> Price | None:
        """The deployment's own price if it has one, else the model's; as effective at `when` (Unix time)."""
        if deployment:
            history = self.histories.get((model, deployment))
            if history is not None and (price := history.at(when)) is not None:
                return price
        history = self.histories.get((model, MODEL_DEFAULT))
        return history.at(when) if history is not None else None


def _to_price(setting: PriceSetting) -> Price:
    prompt = usd_to_nano(setting.prompt)
    cached = usd_to_nano(setting.cached_prompt) if setting.cached_prompt is not None else prompt
    return Price(prompt=prompt, completion=usd_to_nano(setting.completion), cached_prompt=cached)


def configured_prices(settings: Settings) -> dict[tuple[str, str], Price]:
    wanted: dict[tuple[str, str], Price] = {}
    for model_name, model in settings.models.items():
        if model.price is not None:
            wanted[(model_name, MODEL_DEFAULT)] = _to_price(model.price)
        for deployment in model.deployments:
            if deployment.price is not None:
                wanted[(model_name, deployment.name)] = _to_price(deployment.price)
    return wanted


def load_prices(connection: sa.Connection) -> PriceBook:
    histories: dict[tuple[str, str], PriceHistory] = {}
    query = sa.select(prices).order_by(prices.c.effective_from, prices.c.id)
    for row in connection.execute(query).mappings():
        history = histories.setdefault((row["model"], row["deployment"]), PriceHistory())
        effective = as_utc(row["effective_from"])
        assert effective is not None
        history.starts.append(effective.timestamp())
        history.prices.append(
            Price(
                prompt=row["prompt_nanousd_per_mtok"],
                completion=row["completion_nanousd_per_mtok"],
                cached_prompt=row["cached_prompt_nanousd_per_mtok"],
                price_id=row["id"],
            )
        )
    return PriceBook(histories)


def _same(a: Price, b: Price) -> bool:
    return (a.prompt, a.completion, a.cached_prompt) == (b.prompt, b.completion, b.cached_prompt)


def _latest_config_prices(connection: sa.Connection) -> dict[tuple[str, str], Price]:
    latest: dict[tuple[str, str], Price] = {}
    query = sa.select(prices).where(prices.c.source == "config").order_by(prices.c.effective_from, prices.c.id)
    for row in connection.execute(query).mappings():
        latest[(row["model"], row["deployment"])] = Price(
            prompt=row["prompt_nanousd_per_mtok"],
            completion=row["completion_nanousd_per_mtok"],
            cached_prompt=row["cached_prompt_nanousd_per_mtok"],
        )
    return latest


def seed_prices(connection: sa.Connection, settings: Settings, *, now: datetime | None = None) -> int:
    """Insert a new effective-dated row for every configured price that changed in the config since it was last
    seeded. Compared with the last *config* row, not the current price: a price set later through the admin API
    is not undone by a restart with an unchanged config."""
    now = now or utcnow()
    seeded = _latest_config_prices(connection)
    inserted = 0
    for (model, deployment), price in configured_prices(settings).items():
        current = seeded.get((model, deployment))
        if current is not None and _same(current, price):
            continue
        connection.execute(
            prices.insert().values(
                model=model,
                deployment=deployment,
                effective_from=now,
                prompt_nanousd_per_mtok=price.prompt,
                completion_nanousd_per_mtok=price.completion,
                cached_prompt_nanousd_per_mtok=price.cached_prompt,
                source="config",
            )
        )
        inserted += 1
    return inserted


def max_model_price(book: PriceBook, routes: list[ModelRoute], when: float) -> Price | None:
    """The dearest price among the deployments that may serve a request: what its reservation is costed at,
    before routing has chosen one."""
    found = [book.lookup(route.name, deployment.name, when) for route in routes for deployment in route.deployments]
    candidates = [price for price in found if price is not None]
    if not candidates:
        return None
    return Price(
        prompt=max(price.prompt for price in candidates),
        completion=max(price.completion for price in candidates),
        cached_prompt=max(price.cached_prompt for price in candidates),
    )
