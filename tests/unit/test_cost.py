"""gateway.metering.cost: integer nano-USD, one half-even rounding per request, no drift over many rows."""

from __future__ import annotations

from decimal import Decimal
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.metering.cost import (
    NANO_PER_USD,
    TOKENS_PER_PRICE_UNIT,
    Price,
    TokenCounts,
    cost_nanousd,
    nano_to_usd,
    usd_to_nano,
)


@pytest.mark.parametrize(
    ("usd", "nano"),
    [
        (Decimal("0.15"), 150_000_000),
        (Decimal("0.6"), 600_000_000),
        (Decimal("2.50"), 2_500_000_000),
        (Decimal("0.000000001"), 1),
        (Decimal("1E-9"), 1),
        (Decimal(0), 0),
        (Decimal("123456789.123456789"), 123_456_789_123_456_789),
    ],
)
def test_usd_to_nano(usd: Decimal, nano: int) -> None:
    result = usd_to_nano(usd)
    assert result == nano
    assert type(result) is int
    assert nano_to_usd(result) == usd


@pytest.mark.parametrize("usd", [Decimal("0.0000000001"), Decimal("0.1234567891"), Decimal("1E-10")])
def test_usd_to_nano_rejects_sub_nano(usd: Decimal) -> None:
    with pytest.raises(ValueError, match="finer than one nano-USD"):
        usd_to_nano(usd)


def test_nano_to_usd_is_exact() -> None:
    assert nano_to_usd(1) == Decimal("0.000000001")
    assert nano_to_usd(3 * NANO_PER_USD + 7) == Decimal("3.000000007")


PRICE = Price(prompt=150_000_000, completion=600_000_000, cached_prompt=75_000_000)  # $0.15 / $0.60 / $0.075


def test_cost_exact_integer_arithmetic() -> None:
    # 1000 prompt at $0.15/M = 150_000 nano; 500 completion at $0.60/M = 300_000 nano.
    assert cost_nanousd(TokenCounts(prompt=1000, completion=500), PRICE) == 450_000


def test_cached_tokens_are_cheaper_and_part_of_prompt() -> None:
    full = cost_nanousd(TokenCounts(prompt=1000), PRICE)
    cached = cost_nanousd(TokenCounts(prompt=1000, cached_prompt=400), PRICE)
    assert full == 150_000
    assert cached == 600 * 150 + 400 * 75  # 120_000
    assert cached < full


def test_cached_tokens_capped_at_prompt_tokens() -> None:
    capped = cost_nanousd(TokenCounts(prompt=100, cached_prompt=10_000), PRICE)
    assert capped == cost_nanousd(TokenCounts(prompt=100, cached_prompt=100), PRICE) == 100 * 75


@pytest.mark.parametrize(
    ("prompt_tokens", "expected"),
    [
        (499_999, 0),  # 0.499999 → 0
        (500_000, 0),  # 0.5 → 0 (even)
        (500_001, 1),  # 0.500001 → 1
        (1_500_000, 2),  # 1.5 → 2 (even)
        (2_500_000, 2),  # 2.5 → 2 (even)
        (3_500_000, 4),  # 3.5 → 4 (even)
    ],
)
def test_rounding_half_even(prompt_tokens: int, expected: int) -> None:
    one_nano_per_mtok = Price(prompt=1, completion=1, cached_prompt=1)
    assert cost_nanousd(TokenCounts(prompt=prompt_tokens), one_nano_per_mtok) == expected


def test_no_float_precision_loss_on_large_values() -> None:
    # $999,999,999.999999999 per M tokens: 18 significant digits, beyond a float's 15-17.
    price = Price(prompt=999_999_999_999_999_999, completion=0, cached_prompt=0)
    assert cost_nanousd(TokenCounts(prompt=3_000_000), price) == 3 * 999_999_999_999_999_999


_prices = st.builds(
    Price,
    prompt=st.integers(0, 100 * NANO_PER_USD),
    completion=st.integers(0, 100 * NANO_PER_USD),
    cached_prompt=st.integers(0, 100 * NANO_PER_USD),
)
_counts = st.builds(
    TokenCounts,
    prompt=st.integers(0, 2_000_000),
    completion=st.integers(0, 200_000),
    cached_prompt=st.integers(0, 2_000_000),
)


def _exact(tokens: TokenCounts, price: Price) -> Fraction:
    cached = min(tokens.cached_prompt, tokens.prompt)
    numerator = (
        (tokens.prompt - cached) * price.prompt + cached * price.cached_prompt + tokens.completion * price.completion
    )
    return Fraction(numerator, TOKENS_PER_PRICE_UNIT)


@settings(deadline=None)
@given(rows=st.lists(st.tuples(_counts, _prices), min_size=1, max_size=200))
def test_sum_never_drifts_more_than_half_a_nano_per_row(rows: list[tuple[TokenCounts, Price]]) -> None:
    total = 0
    exact_total = Fraction(0)
    for tokens, price in rows:
        cost = cost_nanousd(tokens, price)
        exact = _exact(tokens, price)
        assert abs(cost - exact) <= Fraction(1, 2)
        total += cost
        exact_total += exact
    assert abs(total - exact_total) <= Fraction(len(rows), 2)


@settings(deadline=None)
@given(tokens=_counts, price=_prices)
def test_cost_is_monotonic_in_tokens(tokens: TokenCounts, price: Price) -> None:
    more = TokenCounts(prompt=tokens.prompt + 1, completion=tokens.completion + 1, cached_prompt=tokens.cached_prompt)
    assert cost_nanousd(more, price) >= cost_nanousd(tokens, price)
