"""gateway.relay.sse: event splitting under arbitrary chunking, and reading usage/finish off real chunk texts."""

from __future__ import annotations

import itertools
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.context import Usage
from gateway.relay.sse import (
    SSEDecoder,
    carries_usage,
    event_data,
    finish_reason,
    is_content,
    is_done,
    is_usage_only,
    runs,
    usage_from_chunk,
)

# Literal chunks as vLLM (pydantic, compact) and OpenAI send them.
VLLM_OPENER = (
    b'{"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"m",'
    b'"choices":[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}]}'
)
VLLM_CONTENT = (
    b'{"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"m",'
    b'"choices":[{"index":0,"delta":{"content":" Paris"},"logprobs":null,"finish_reason":null}]}'
)
VLLM_LAST = (
    b'{"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"m",'
    b'"choices":[{"index":0,"delta":{"content":"."},"logprobs":null,"finish_reason":"stop","stop_reason":null}]}'
)
VLLM_USAGE = (
    b'{"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"m","choices":[],'
    b'"usage":{"prompt_tokens":17,"total_tokens":25,"completion_tokens":8}}'
)
VLLM_COMPLETION_TEXT = (
    b'{"id":"cmpl-1","object":"text_completion","created":1,"model":"m",'
    b'"choices":[{"index":0,"text":" world","logprobs":null,"finish_reason":"length","stop_reason":null}]}'
)
OPENAI_CONTENT_WITH_NULL_USAGE = (
    b'{"id":"chatcmpl-A","object":"chat.completion.chunk","created":1,"model":"gpt-4o-mini",'
    b'"system_fingerprint":"fp_1","choices":[{"index":0,"delta":{"content":"Hi"},"logprobs":null,'
    b'"finish_reason":null}],"usage":null}'
)
OPENAI_USAGE = (
    b'{"id":"chatcmpl-A","object":"chat.completion.chunk","created":1,"model":"o3-mini",'
    b'"system_fingerprint":"fp_1","choices":[],"usage":{"prompt_tokens":1200,"completion_tokens":300,'
    b'"total_tokens":1500,"prompt_tokens_details":{"cached_tokens":1024,"audio_tokens":0},'
    b'"completion_tokens_details":{"reasoning_tokens":192,"audio_tokens":0,'
    b'"accepted_prediction_tokens":0,"rejected_prediction_tokens":0}}}'
)
ERROR_CHUNK = b'{"error":{"message":"boom","type":"server_error","param":null,"code":null}}'


# --- SSEDecoder ------------------------------------------------------------------------------------------

_DATA_TEXT = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n"), min_size=0, max_size=40
)


@st.composite
def _event(draw: st.DrawFn) -> bytes:
    newline = draw(st.sampled_from(["\n", "\r\n"]))
    kind = draw(st.sampled_from(["data", "multi", "comment", "named"]))
    lines: list[str]
    if kind == "data":
        lines = ["data: " + draw(_DATA_TEXT)]
    elif kind == "multi":
        lines = ["data: " + draw(_DATA_TEXT) for _ in range(draw(st.integers(2, 4)))]
    elif kind == "comment":
        lines = [": keep-alive " + draw(_DATA_TEXT)]
    else:
        lines = ["event: " + draw(st.sampled_from(["message", "ping"])), "data:" + draw(_DATA_TEXT)]
    return ("".join(line + newline for line in lines) + newline).encode()


def _feed_split(events: list[bytes], cuts: list[int]) -> tuple[list[list[bytes]], list[bytes]]:
    stream = b"".join(events)
    bounds = [0, *sorted({cut for cut in cuts if 0 < cut < len(stream)}), len(stream)]
    decoder = SSEDecoder()
    per_chunk = [decoder.feed(stream[a:b]) for a, b in itertools.pairwise(bounds)]
    return per_chunk, [stream[:b] for b in bounds[1:]]


@settings(deadline=None)  # no timing flakiness on a loaded CI machine
@given(events=st.lists(_event(), min_size=1, max_size=8), cuts=st.lists(st.integers(0, 2000), max_size=30))
def test_any_split_yields_the_same_events_each_as_soon_as_complete(events: list[bytes], cuts: list[int]) -> None:
    per_chunk, prefixes = _feed_split(events, cuts)
    assert [event for batch in per_chunk for event in batch] == events  # same bytes, never merged or split
    ends = []
    offset = 0
    for event in events:
        offset += len(event)
        ends.append(offset)
    emitted = 0
    for batch, prefix in zip(per_chunk, prefixes, strict=True):
        emitted += len(batch)
        # Every event whose blank line has arrived is out; none whose blank line has not.
        assert emitted == sum(1 for end in ends if end <= len(prefix))


@settings(deadline=None)  # no timing flakiness on a loaded CI machine
@given(events=st.lists(_event(), min_size=1, max_size=5), data=st.data())
def test_byte_at_a_time_holds_partial_trailing_data(events: list[bytes], data: st.DataObject) -> None:
    tail = data.draw(st.sampled_from([b"", b'data: {"partial', b"data: x\n", b"data: x\r\n\r", b":"]))
    stream = b"".join(events) + tail
    decoder = SSEDecoder()
    out: list[bytes] = []
    for index in range(len(stream)):
        out += decoder.feed(stream[index : index + 1])
    assert out == events
    assert decoder.pending == tail


def test_crlf_separators() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\r\n\r\ndata: b\r\n") == [b"data: a\r\n\r\n"]
    assert decoder.pending == b"data: b\r\n"
    assert decoder.feed(b"\r") == []
    assert decoder.feed(b"\n") == [b"data: b\r\n\r\n"]
    assert decoder.pending == b""


def test_mixed_separators_keep_stream_order() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: 1\n\ndata: 2\r\n\r\ndata: 3\n\n") == [
        b"data: 1\n\n",
        b"data: 2\r\n\r\n",
        b"data: 3\n\n",
    ]


def test_many_events_in_one_chunk_are_not_merged() -> None:
    chunk = b"".join(b"data: %d\n\n" % i for i in range(100))
    events = SSEDecoder().feed(chunk)
    assert len(events) == 100
    assert events[42] == b"data: 42\n\n"


# --- event_data ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("event", "expected"),
    [
        (b'data: {"a":1}\n\n', b'{"a":1}'),
        (b'data:{"a":1}\r\n\r\n', b'{"a":1}'),
        (b"data: [DONE]\n\n", b"[DONE]"),
        (b"data: one\ndata: two\n\n", b"one\ntwo"),
        (b"event: message\ndata: x\n\n", b"x"),
        (b": keep-alive\n\n", None),
        (b"event: ping\n\n", None),
    ],
)
def test_event_data(event: bytes, expected: bytes | None) -> None:
    assert event_data(event) == expected


def test_is_done() -> None:
    assert is_done(b"[DONE]")
    assert not is_done(b'{"content":"[DONE]"}')


# --- classification --------------------------------------------------------------------------------------


def test_carries_usage() -> None:
    assert carries_usage(VLLM_USAGE)
    assert carries_usage(OPENAI_USAGE)
    assert not carries_usage(VLLM_CONTENT)
    assert not carries_usage(OPENAI_CONTENT_WITH_NULL_USAGE)
    assert not carries_usage(b'{"choices":[],"usage": null}')
    # The word in generated text is escaped inside a JSON string, so it is never mistaken for the key.
    assert not carries_usage(b'{"choices":[{"delta":{"content":"the \\"usage\\": field"}}]}')


def test_is_usage_only() -> None:
    assert is_usage_only(VLLM_USAGE)
    assert is_usage_only(OPENAI_USAGE)
    assert is_usage_only(b'{"choices": [], "usage": {"prompt_tokens": 1}}')
    assert not is_usage_only(VLLM_CONTENT)
    assert not is_usage_only(OPENAI_CONTENT_WITH_NULL_USAGE)


@pytest.mark.parametrize(
    ("chunk", "expected"),
    [
        (VLLM_OPENER, False),
        (VLLM_CONTENT, True),
        (VLLM_LAST, True),
        (VLLM_USAGE, False),
        (VLLM_COMPLETION_TEXT, True),
        (b'{"choices":[{"index":0,"text":"","finish_reason":null}]}', False),
        (OPENAI_CONTENT_WITH_NULL_USAGE, True),
        (OPENAI_USAGE, False),
        (ERROR_CHUNK, False),
    ],
)
def test_is_content(chunk: bytes, expected: bool) -> None:
    assert is_content(chunk) is expected


def test_openai_closing_chunk_with_empty_delta_is_not_content() -> None:
    closing = (
        b'{"id":"chatcmpl-A","object":"chat.completion.chunk","created":1,"model":"gpt-4o-mini",'
        b'"choices":[{"index":0,"delta":{},"logprobs":null,"finish_reason":"stop"}],"usage":null}'
    )
    assert not is_content(closing)


@pytest.mark.parametrize(
    ("chunk", "expected"),
    [
        (VLLM_CONTENT, None),
        (VLLM_LAST, "stop"),
        (VLLM_COMPLETION_TEXT, "length"),
        (b'{"choices":[{"delta":{},"finish_reason": "tool_calls"}]}', "tool_calls"),
        (VLLM_USAGE, None),
        # The same words in generated text are escaped and must not be read as the field.
        (b'{"choices":[{"delta":{"content":"\\"finish_reason\\":\\"stop\\""},"finish_reason":null}]}', None),
    ],
)
def test_finish_reason(chunk: bytes, expected: str | None) -> None:
    assert finish_reason(chunk) == expected


# --- usage -----------------------------------------------------------------------------------------------


def test_usage_from_vllm_chunk() -> None:
    assert usage_from_chunk(VLLM_USAGE) == Usage(
        prompt_tokens=17, completion_tokens=8, cached_prompt_tokens=0, reasoning_tokens=0, source="backend"
    )


def test_usage_from_openai_chunk_reads_details() -> None:
    assert usage_from_chunk(OPENAI_USAGE) == Usage(
        prompt_tokens=1200, completion_tokens=300, cached_prompt_tokens=1024, reasoning_tokens=192, source="backend"
    )


@pytest.mark.parametrize(
    "chunk",
    [OPENAI_CONTENT_WITH_NULL_USAGE, VLLM_CONTENT, b"not json", b"[1,2]", b'"usage"', b"{"],
)
def test_no_usage(chunk: bytes) -> None:
    assert usage_from_chunk(chunk) is None


def test_usage_ignores_nonsense_values() -> None:
    usage = usage_from_chunk(
        b'{"usage":{"prompt_tokens":-3,"completion_tokens":true,"prompt_tokens_details":null,'
        b'"completion_tokens_details":{"reasoning_tokens":"7"}}}'
    )
    assert usage == Usage(source="backend")


# --- runs of plain text events (the relay's fast path) ---------------------------------------------------

OPENAI_LAST = (
    b'{"id":"chatcmpl-A","object":"chat.completion.chunk","created":1,"model":"gpt-4o-mini",'
    b'"choices":[{"index":0,"delta":{},"logprobs":null,"finish_reason":"stop"}],"usage":null}'
)


def _content(text: str) -> bytes:
    return VLLM_CONTENT.replace(b" Paris", json.dumps(text)[1:-1].encode())


@st.composite
def _stream_event(draw: st.DrawFn) -> bytes:
    """Events as upstreams send them, plain text ones most of all, and every kind the relay must read."""
    kinds = "text text text opener last usage openai openai_last completion error done comment multi crlf blank"
    odd = ["spaced", "running_usage", "completion_empty", "empty_delta", "no_choices"]
    kind = draw(st.sampled_from([*kinds.split(), *odd]))
    text = draw(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=12))
    payload = {
        "text": _content(text),
        "opener": VLLM_OPENER,
        "last": VLLM_LAST,
        "usage": VLLM_USAGE,
        "openai": OPENAI_CONTENT_WITH_NULL_USAGE,
        "openai_last": OPENAI_LAST,
        "completion": VLLM_COMPLETION_TEXT,
        "error": ERROR_CHUNK,
        "done": b"[DONE]",
        # vLLM's continuous usage stats: text and usage in one chunk
        "running_usage": _content(text)[:-1] + b',"usage":{"prompt_tokens":5,"completion_tokens":1}}',
        "completion_empty": VLLM_COMPLETION_TEXT.replace(b'" world"', b'""').replace(b'"length"', b"null"),
        "empty_delta": b'{"choices":[{"index":0,"delta":{},"finish_reason":null}]}',
        "no_choices": b'{"id":"chatcmpl-1","choices":[]}',
    }.get(kind)
    if payload is not None:
        return b"data: " + payload + b"\n\n"
    return {
        "comment": b": keep-alive\n\n",
        "multi": b"data: " + _content(text) + b"\ndata: more\n\n",
        "crlf": b"data: " + _content(text) + b"\r\n\r\n",
        "blank": b"\n",  # a stray newline: three in a row with the next separator
        "spaced": b'data: {"choices":[{"delta": {}, "finish_reason": "stop"}]}\n\n',
    }[kind]


def _blocks(stream: bytes, bounds: list[int]) -> list[list[tuple[bytes, int]]]:
    decoder = SSEDecoder()
    out = []
    for a, b in itertools.pairwise(bounds):
        block = decoder.feed_block(stream[a:b])
        out.append(runs(block) if block is not None else [(event, 0) for event in decoder.feed(stream[a:b])])
    return out


@settings(deadline=None)  # no timing flakiness on a loaded CI machine
@given(events=st.lists(_stream_event(), min_size=1, max_size=12), cuts=st.lists(st.integers(0, 4000), max_size=12))
def test_runs_relay_the_same_bytes_and_hold_only_plain_text(events: list[bytes], cuts: list[int]) -> None:
    """Per read, the pieces are exactly the bytes `feed` would give as events; a run of n holds n events that
    the per-event checks would only count (text, no usage, no finish reason, not [DONE])."""
    stream = b"".join(events)
    bounds = [0, *sorted({cut for cut in cuts if 0 < cut < len(stream)}), len(stream)]
    reference = SSEDecoder()
    for (a, b), pieces in zip(itertools.pairwise(bounds), _blocks(stream, bounds), strict=True):
        assert b"".join(piece for piece, _ in pieces) == b"".join(reference.feed(stream[a:b]))
        for piece, count in pieces:
            if not count:
                continue
            inside = SSEDecoder().feed(piece)
            assert len(inside) == count and b"".join(inside) == piece
            for event in inside:
                data = event_data(event)
                assert data is not None and not is_done(data)
                assert not carries_usage(data) and is_content(data) and finish_reason(data) is None


def test_a_vllm_stream_is_one_run_between_the_events_that_matter() -> None:
    texts = [_content(f" w{index}") for index in range(20)]
    stream = b"".join(b"data: " + payload + b"\n\n" for payload in (VLLM_OPENER, *texts, VLLM_LAST, VLLM_USAGE))
    block = SSEDecoder().feed_block(stream + b'data: [DONE]\n\ndata: {"partial')
    assert block is not None
    assert [count for _, count in runs(block)] == [0, 20, 0, 0, 0]  # opener, the text, finish, usage, [DONE]


def test_feed_block_leaves_crlf_streams_to_feed() -> None:
    decoder = SSEDecoder()
    assert decoder.feed_block(b"data: a\r\n\r\n") is None
    assert decoder.pending == b""  # nothing consumed
    assert decoder.feed(b"data: a\r\n\r\n") == [b"data: a\r\n\r\n"]
