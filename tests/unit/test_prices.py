"""gateway.metering.prices: effective-dated lookups, and seeding from the config into a real SQLite database."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from gateway.db.engine import create_engine
from gateway.db.migrate import upgrade
from gateway.db.schema import prices
from gateway.metering.cost import Price
from gateway.metering.prices import MODEL_DEFAULT, PriceBook, PriceHistory, load_prices, seed_prices
from gateway.settings import Settings, parse_settings

T0 = datetime(2025, 1, 1, tzinfo=UTC)
A = Price(prompt=100, completion=200, cached_prompt=50, price_id=1)
B = Price(prompt=110, completion=220, cached_prompt=55, price_id=2)
OVERRIDE = Price(prompt=1, completion=2, cached_prompt=1, price_id=3)


def _history(*entries: tuple[datetime, Price]) -> PriceHistory:
    return PriceHistory(starts=[when.timestamp() for when, _ in entries], prices=[price for _, price in entries])


def test_history_at() -> None:
    history = _history((T0, A), (T0 + timedelta(days=30), B))
    assert history.at((T0 - timedelta(seconds=1)).timestamp()) is None
    assert history.at(T0.timestamp()) == A  # effective from the instant itself
    assert history.at((T0 + timedelta(days=29)).timestamp()) == A
    assert history.at((T0 + timedelta(days=30)).timestamp()) == B
    assert history.at((T0 + timedelta(days=3000)).timestamp()) == B
    assert PriceHistory().at(T0.timestamp()) is None


def test_lookup_deployment_override_and_model_default() -> None:
    book = PriceBook(
        {
            ("m", MODEL_DEFAULT): _history((T0, A)),
            ("m", "cheap-gpu"): _history((T0 + timedelta(days=10), OVERRIDE)),
        }
    )
    later = (T0 + timedelta(days=11)).timestamp()
    assert book.lookup("m", "cheap-gpu", later) == OVERRIDE
    assert book.lookup("m", "other-gpu", later) == A
    assert book.lookup("m", None, later) == A
    # Before the override takes effect, the model's price applies.
    assert book.lookup("m", "cheap-gpu", (T0 + timedelta(days=5)).timestamp()) == A
    assert book.lookup("m", "cheap-gpu", (T0 - timedelta(days=1)).timestamp()) is None
    assert book.lookup("unknown", "cheap-gpu", later) is None


def test_lookup_override_without_model_default() -> None:
    book = PriceBook({("m", "d"): _history((T0, OVERRIDE))})
    assert book.lookup("m", "d", T0.timestamp()) == OVERRIDE
    assert book.lookup("m", "e", T0.timestamp()) is None


# --- seeding ---------------------------------------------------------------------------------------------


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[sa.Engine]:
    engine = create_engine(f"sqlite:///{tmp_path / 'gateway.db'}")
    upgrade(engine)
    yield engine
    engine.dispose()


def _settings(model_price: dict[str, Any], deployment_price: dict[str, Any] | None = None) -> Settings:
    deployment: dict[str, Any] = {"name": "d1", "base_url": "http://127.0.0.1:1/v1"}
    if deployment_price is not None:
        deployment["price"] = deployment_price
    return parse_settings(
        {
            "auth": {"pepper": "p" * 32},
            "models": {
                "m": {"price": model_price, "deployments": [deployment]},
                "free": {"deployments": [{"name": "d2", "base_url": "http://127.0.0.1:2/v1"}]},
            },
        }
    )


def _rows(engine: sa.Engine) -> list[dict[str, Any]]:
    with engine.connect() as connection:
        query = sa.select(prices).order_by(prices.c.model, prices.c.deployment, prices.c.effective_from)
        return [dict(row) for row in connection.execute(query).mappings()]


def test_seed_inserts_once_and_keeps_history(engine: sa.Engine) -> None:
    settings = _settings({"prompt": 0.15, "completion": 0.60, "cached_prompt": 0.075}, {"prompt": 0.1, "completion": 1})
    with engine.begin() as connection:
        assert seed_prices(connection, settings, now=T0) == 2
    rows = _rows(engine)
    assert [(r["model"], r["deployment"]) for r in rows] == [("m", ""), ("m", "d1")]
    assert (rows[0]["prompt_nanousd_per_mtok"], rows[0]["completion_nanousd_per_mtok"]) == (150_000_000, 600_000_000)
    assert rows[0]["cached_prompt_nanousd_per_mtok"] == 75_000_000
    assert rows[1]["cached_prompt_nanousd_per_mtok"] == 100_000_000  # no cached price: the prompt price
    assert all(r["source"] == "config" for r in rows)

    # Unchanged config: nothing new, however often it is seeded.
    with engine.begin() as connection:
        assert seed_prices(connection, settings, now=T0 + timedelta(days=1)) == 0
        assert seed_prices(connection, settings, now=T0 + timedelta(days=2)) == 0
    assert len(_rows(engine)) == 2

    # A changed model price: one new effective-dated row; the old one stays.
    changed = _settings({"prompt": 0.2, "completion": 0.60, "cached_prompt": 0.075}, {"prompt": 0.1, "completion": 1})
    later = T0 + timedelta(days=3)
    with engine.begin() as connection:
        assert seed_prices(connection, changed, now=later) == 1
    rows = _rows(engine)
    model_rows = [r for r in rows if r["deployment"] == ""]
    assert [r["prompt_nanousd_per_mtok"] for r in model_rows] == [150_000_000, 200_000_000]

    with engine.connect() as connection:
        book = load_prices(connection)
    history = book.histories[("m", MODEL_DEFAULT)]
    assert history.starts == [T0.timestamp(), later.timestamp()]  # naive SQLite times read back as UTC
    assert book.lookup("m", None, (later - timedelta(seconds=1)).timestamp()).prompt == 150_000_000  # type: ignore[union-attr]
    assert book.lookup("m", None, later.timestamp()).prompt == 200_000_000  # type: ignore[union-attr]
    assert book.lookup("m", "d1", later.timestamp()).prompt == 100_000_000  # type: ignore[union-attr]
    assert book.lookup("free", "d2", later.timestamp()) is None
    assert all(price.price_id is not None for price in history.prices)

    # Changing back re-inserts (the current price differs), history keeps all three.
    with engine.begin() as connection:
        assert seed_prices(connection, settings, now=later + timedelta(days=1)) == 1
    assert len([r for r in _rows(engine) if r["deployment"] == ""]) == 3


def test_seed_detects_a_change_of_the_cached_price_alone(engine: sa.Engine) -> None:
    with engine.begin() as connection:
        assert seed_prices(connection, _settings({"prompt": 1, "completion": 2}), now=T0) == 1
        changed = _settings({"prompt": 1, "completion": 2, "cached_prompt": 0.5})
        assert seed_prices(connection, changed, now=T0 + timedelta(hours=1)) == 1
        assert seed_prices(connection, changed, now=T0 + timedelta(hours=2)) == 0
    assert [r["cached_prompt_nanousd_per_mtok"] for r in _rows(engine)] == [1_000_000_000, 500_000_000]
