"""Cost arithmetic. Money is integer nano-USD (1e-9 USD); prices are integer nano-USD per million tokens.

Everything here is integer or Decimal arithmetic: never float, so a sum of a month of rows is exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

NANO_PER_USD = 1_000_000_000
TOKENS_PER_PRICE_UNIT = 1_000_000


def usd_to_nano(usd: Decimal) -> int:
    nano = usd * NANO_PER_USD
    if nano != nano.to_integral_value():
        raise ValueError(f"{usd} USD is finer than one nano-USD")
    return int(nano)


def nano_to_usd(nano: int) -> Decimal:
    return Decimal(nano) / NANO_PER_USD


@dataclass(frozen=True, slots=True)
class Price:
    """nano-USD per one million tokens of each kind; `price_id` is the SQL row it came from."""

    prompt: int
    completion: int
    cached_prompt: int
    price_id: int | None = None


@dataclass(frozen=True, slots=True)
class TokenCounts:
    prompt: int = 0
    completion: int = 0
    cached_prompt: int = 0  # part of `prompt`, billed at the cached price


def cost_nanousd(tokens: TokenCounts, price: Price) -> int:
    cached = min(tokens.cached_prompt, tokens.prompt)
    numerator = (
        (tokens.prompt - cached) * price.prompt + cached * price.cached_prompt + tokens.completion * price.completion
    )
    # One rounding per request, half-to-even so that rounding errors do not drift one way over many rows. Integer
    # division is exact (this runs for every request: Decimal would give the same result, slower).
    quotient, remainder = divmod(numerator, TOKENS_PER_PRICE_UNIT)
    twice = 2 * remainder
    if twice > TOKENS_PER_PRICE_UNIT or (twice == TOKENS_PER_PRICE_UNIT and quotient % 2):
        quotient += 1
    return quotient
