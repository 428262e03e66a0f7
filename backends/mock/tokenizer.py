"""The mock backend's tokenizer: deterministic, exact, and importable by the gateway's tests.

A token is a run of word characters or a single punctuation character
(``re.findall(r"\\w+|[^\\w\\s]", text)``). A chat prompt is rendered with a ChatML-like
template whose overhead is fixed: 3 tokens per message (start, separator, end) plus
3 tokens priming the assistant's reply. Every count the mock reports in ``usage`` or
from ``/tokenize`` comes from these functions, so a test can compute the exact usage
the gateway must record without asking the backend.

The ``count_*`` functions are the fast path (no token lists); the ``*_tokens``
functions build the token strings (for ``/tokenize`` ids and the prefix-cache
simulation). ``count_x(v) == len(x_tokens(v))`` always holds.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Iterable, Sequence
from functools import lru_cache
from typing import Any

__all__ = [
    "CHAT_MESSAGE_OVERHEAD",
    "CHAT_PRIMING_TOKENS",
    "chat_prompt_text",
    "chat_prompt_tokens",
    "content_text",
    "count_chat_prompt",
    "count_embedding_input",
    "count_prompt",
    "count_text",
    "prompt_tokens",
    "token_ids",
    "tokenize",
]

_TOKEN_RE = re.compile(r"\w+|[^\w\s]")

#: Template tokens added per chat message: ``<|im_start|>``, ``<|im_sep|>``, ``<|im_end|>``.
CHAT_MESSAGE_OVERHEAD = 3
#: Tokens that prime the assistant's reply at the end of a chat prompt.
CHAT_PRIMING_TOKENS = 3

_IM_START = "<|im_start|>"
_IM_SEP = "<|im_sep|>"
_IM_END = "<|im_end|>"
_PRIMING = [_IM_START, "assistant", _IM_SEP]
# Special tokens get small fixed ids; ordinary tokens are hashed above them.
_SPECIAL_IDS = {_IM_START: 1, _IM_SEP: 2, _IM_END: 3}
_FIRST_ORDINARY_ID = 1000
_ORDINARY_ID_SPAN = 150_000


#: Texts up to this long are memoized: benchmarks and multi-turn chats resend the same
#: messages, and the regex is the mock's biggest per-request cost.
_MEMO_MAX_CHARS = 16384
_findall = _TOKEN_RE.findall


@lru_cache(maxsize=4096)
def _memo_tokens(text: str) -> tuple[str, ...]:
    return tuple(_findall(text))


def tokenize(text: str) -> list[str] | tuple[str, ...]:
    """The token strings of a plain text (a shared tuple when memoized: do not mutate)."""
    if len(text) <= _MEMO_MAX_CHARS:
        return _memo_tokens(text)
    return _findall(text)


def count_text(text: str) -> int:
    """How many tokens a plain text has."""
    return len(tokenize(text))


def content_text(content: Any) -> str:
    """The text a chat message's ``content`` contributes: a string, or the ``text`` parts of a list.

    Non-text parts (images, audio) count for nothing, like a text-only model's template.
    """
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(_text_parts(content))
    return ""


def _text_parts(parts: Iterable[Any]) -> Iterable[str]:
    for part in parts:
        if isinstance(part, dict) and part.get("type", "text") == "text":
            text = part.get("text")
            if isinstance(text, str):
                yield text


def _content_count(content: Any) -> int:
    if isinstance(content, str):
        return count_text(content)
    if isinstance(content, list):
        # Counting each part separately equals counting them joined by "\n" (whitespace never merges).
        return sum(count_text(text) for text in _text_parts(content))
    return 0


def count_chat_prompt(messages: Sequence[Any]) -> int:
    """Prompt tokens of a chat request: per message 3 + role + name + content, plus 3 for priming."""
    total = CHAT_PRIMING_TOKENS
    for message in messages:
        if not isinstance(message, dict):
            continue
        total += CHAT_MESSAGE_OVERHEAD
        role = message.get("role")
        if isinstance(role, str):
            total += count_text(role)
        name = message.get("name")
        if isinstance(name, str):
            total += count_text(name)
        total += _content_count(message.get("content"))
    return total


def chat_prompt_tokens(messages: Sequence[Any]) -> list[str]:
    """The token strings of a rendered chat prompt (same length as :func:`count_chat_prompt`)."""
    out: list[str] = []
    for message in messages:
        if not isinstance(message, dict):
            continue
        out.append(_IM_START)
        role = message.get("role")
        if isinstance(role, str):
            out += tokenize(role)
        name = message.get("name")
        if isinstance(name, str):
            out += tokenize(name)
        out.append(_IM_SEP)
        content = message.get("content")
        if isinstance(content, str):
            out += tokenize(content)
        elif isinstance(content, list):
            for text in _text_parts(content):
                out += tokenize(text)
        out.append(_IM_END)
    out += _PRIMING
    return out


def chat_prompt_text(messages: Sequence[Any]) -> str:
    """A canonical text of a chat prompt, independent of JSON key order (seeds generation)."""
    parts: list[str] = []
    for message in messages:
        if isinstance(message, dict):
            role = message.get("role")
            name = message.get("name")
            parts.append(
                f"{role if isinstance(role, str) else ''}\x1f{name if isinstance(name, str) else ''}"
                f"\x1f{content_text(message.get('content'))}"
            )
    return "\x1e".join(parts)


def _is_int_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in value)


def count_prompt(prompt: Any) -> int:
    """Prompt tokens of a completions ``prompt`` or an embeddings ``input``.

    A string counts its tokens; a list of ints is already tokenized (its length); a
    list of strings or of int lists is a batch, and the batch's usage is the sum.
    """
    if isinstance(prompt, str):
        return count_text(prompt)
    if isinstance(prompt, list):
        if _is_int_list(prompt):
            return len(prompt)
        return sum(count_prompt(item) for item in prompt)
    return 0


#: Embeddings ``input`` follows the same rules as a completions ``prompt``.
count_embedding_input = count_prompt


def prompt_tokens(prompt: Any) -> list[str] | list[int]:
    """The tokens of a completions prompt: token strings, or the ids themselves if already tokenized."""
    if isinstance(prompt, str):
        return list(tokenize(prompt))
    if _is_int_list(prompt):
        return list(prompt)
    out: list[Any] = []
    if isinstance(prompt, list):
        for item in prompt:
            out += prompt_tokens(item)
    return out


def token_ids(tokens: Sequence[str | int]) -> list[int]:
    """Deterministic ids for token strings (ints pass through), as ``/tokenize`` returns them."""
    out: list[int] = []
    for token in tokens:
        if isinstance(token, int):
            out.append(token)
            continue
        special = _SPECIAL_IDS.get(token)
        if special is not None:
            out.append(special)
        else:
            out.append(_FIRST_ORDINARY_ID + zlib.crc32(token.encode()) % _ORDINARY_ID_SPAN)
    return out
