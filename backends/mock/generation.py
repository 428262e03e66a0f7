"""Deterministic replies and embeddings.

A reply is a function of (model, prompt text, ``seed``, choice index) only: one
BLAKE2b digest of those is the whole "PRNG" (its first bytes pick the natural length,
the following bytes pick one word each), which is cheaper than seeding a
``random.Random`` per request and gives the same answer in every worker process.

Every vocabulary word is a single token for the mock tokenizer, so
``count_text(reply_text) == completion_tokens``.
"""

from __future__ import annotations

import base64
import hashlib
import math
import sys
from array import array
from dataclasses import dataclass
from functools import lru_cache

__all__ = ["MAX_NATURAL_TOKENS", "MIN_NATURAL_TOKENS", "VOCAB", "Reply", "embedding", "generate"]

# 64 words so that one digest byte picks one word uniformly (byte % 64).
VOCAB: tuple[str, ...] = (
    "the", "a", "model", "token", "gateway", "request", "reply", "stream",
    "quota", "usage", "ledger", "route", "backend", "worker", "cache", "prefix",
    "fast", "slow", "exact", "mock", "vector", "answer", "question", "river",
    "mountain", "cloud", "light", "shadow", "signal", "noise", "number", "letter",
    "green", "blue", "red", "amber", "quiet", "loud", "early", "late",
    "open", "closed", "north", "south", "east", "west", "alpha", "beta",
    "gamma", "delta", "sigma", "omega", "paper", "stone", "glass", "metal",
    "orbit", "planet", "comet", "star", "ocean", "island", "forest", "desert",
)  # fmt: skip
assert len(VOCAB) == 64
_FIRST = VOCAB
_LATER = tuple(" " + word for word in VOCAB)

MIN_NATURAL_TOKENS = 8
_LENGTH_SPREAD = 24
MAX_NATURAL_TOKENS = MIN_NATURAL_TOKENS + _LENGTH_SPREAD - 1
_LENGTH_BYTES = 4  # digest bytes 0..3 pick the length, bytes 4.. pick the words


@dataclass(frozen=True, slots=True)
class Reply:
    """One choice: its text pieces (one per token, as streamed) and why it ended."""

    pieces: list[str]
    finish_reason: str  # "stop" or "length"

    @property
    def text(self) -> str:
        return "".join(self.pieces)


def generate(model: str, prompt_text: str, seed: int | None, index: int, max_tokens: int | None) -> Reply:
    """The reply for choice ``index``; it stops at ``max_tokens`` (``length``) if that is shorter."""
    digest = hashlib.blake2b(
        f"{model}\x00{seed}\x00{index}\x00{prompt_text}".encode(errors="surrogatepass"), digest_size=64
    ).digest()
    natural = MIN_NATURAL_TOKENS + int.from_bytes(digest[:_LENGTH_BYTES], "little") % _LENGTH_SPREAD
    if max_tokens is not None and max_tokens < natural:
        length, finish_reason = max_tokens, "length"
    else:
        length, finish_reason = natural, "stop"
    if length <= 0:
        return Reply([], finish_reason)
    words = digest[_LENGTH_BYTES : _LENGTH_BYTES + length]
    pieces = [_FIRST[words[0] & 63]]
    pieces += [_LATER[b & 63] for b in words[1:]]
    return Reply(pieces, finish_reason)


@lru_cache(maxsize=8192)
def _unit_vector(model: str, key: str, dim: int) -> array:  # type: ignore[type-arg]
    # SHAKE gives as many pseudo-random bytes as the dimension needs from one call.
    raw = array("I", hashlib.shake_128(f"{model}\x00{key}".encode(errors="surrogatepass")).digest(4 * dim))
    values = [u / 2147483648.0 - 1.0 for u in raw]
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    return array("f", [v / norm for v in values])


def embedding(model: str, key: str, dim: int, dimensions: int | None, as_base64: bool) -> list[float] | str:
    """A deterministic unit vector for one input, as floats or base64 of little-endian float32.

    ``dimensions`` (Matryoshka-style) keeps the first components and re-normalizes.
    Floats are float32-rounded so both encodings carry the same numbers.
    """
    vector = _unit_vector(model, key, dim)
    if dimensions is not None and dimensions < dim:
        head = vector[:dimensions]
        norm = math.sqrt(sum(v * v for v in head)) or 1.0
        vector = array("f", [v / norm for v in head])
    if not as_base64:
        return vector.tolist()
    if sys.byteorder != "little":
        vector = array("f", vector)
        vector.byteswap()
    return base64.b64encode(vector.tobytes()).decode("ascii")
