"""Server-sent events: splitting a byte stream into whole events, and reading what the gateway needs from them.

Events are relayed as the bytes they arrived as; only events the gateway must act on (usage, finish reason)
are parsed, and only the small part that matters.
"""

from __future__ import annotations

import re

import orjson

from gateway.context import Usage

DONE = b"data: [DONE]\n\n"
_SEPARATORS = (b"\n\n", b"\r\n\r\n")
_FINISH_REASON = re.compile(rb'"finish_reason":\s*"([A-Za-z_]+)"')
# Whatever makes an event more than plain generated text, as the per-event checks below see it: [DONE], usage,
# a finish reason, an empty or role-only delta, an empty content or text, an empty choices list, an error. (A
# superset: a mark only means the event is read the slow way.) Found with `bytes.find`, each mark at most a few
# times per block: a regular expression of these alternatives tries every quote of the block (with it, `runs`
# took 1.7x as long on a vLLM stream). The spaced forms are looked for only in blocks that have `": ` at all.
_MARKS = (b'"usage"', b'"finish_reason":"', b'"delta":{}', b'":""', b'"choices":[]', b'"error"', b"[DONE]")
_SPACED_MARKS = (b'"finish_reason": "', b'"delta": {}', b'"choices": []')


class SSEDecoder:
    """Feeds arbitrary chunks, yields each complete event (including its terminating blank line) at once."""

    __slots__ = ("_buffer",)

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, chunk: bytes) -> list[bytes]:
        data = self._buffer + chunk if self._buffer else chunk
        events: list[bytes] = []
        start = 0
        while True:
            end, width = _next_separator(data, start)
            if end < 0:
                break
            events.append(data[start : end + width])
            start = end + width
        self._buffer = data[start:] if start < len(data) else b""
        return events

    def feed_block(self, chunk: bytes) -> bytes | None:
        """Like `feed`, but the complete events as one block, when the stream is plainly laid out (LF line ends,
        no run of three newlines): then the block ends where `feed`'s last event would. None otherwise, and
        nothing consumed: call `feed`."""
        data = self._buffer + chunk if self._buffer else chunk
        if b"\r" in data or b"\n\n\n" in data:
            return None
        last = data.rfind(b"\n\n")
        if last < 0:
            self._buffer = data
            return b""
        self._buffer = data[last + 2 :]
        return data[: last + 2]

    @property
    def pending(self) -> bytes:
        return self._buffer


def _next_separator(data: bytes, start: int) -> tuple[int, int]:
    lf = data.find(b"\n\n", start)
    if b"\r" not in data:  # the common case: one scan
        return lf, 2
    crlf = data.find(b"\r\n\r\n", start)
    if crlf >= 0 and (lf < 0 or crlf < lf):
        return crlf, 4
    return lf, 2


def runs(block: bytes) -> list[tuple[bytes, int]]:
    """A block of whole events (from `feed_block`), grouped for the relay: `(run, n)` for n consecutive events of
    plain generated text, each one `data:` line that none of the checks below would act on beyond counting it
    (relayed as they are, counted, not parsed one by one), and `(event, 0)` for each event to be read on its own."""
    start, end = 0, len(block)
    if block.find(b"\n\n") + 2 == end:
        return [(block, 0)] if block else []  # one event (a paced stream's usual read): read it, no grouping
    marks = _Marks(block)
    pieces: list[tuple[bytes, int]] = []
    while start < end:
        notable = marks.next(start)
        boundary = block.rfind(b"\n\n", start, notable)
        if boundary >= 0:
            _add_run(pieces, block[start : boundary + 2])
            start = boundary + 2
        if notable < end:
            event_end = block.find(b"\n\n", notable) + 2
            pieces.append((block[start:event_end], 0))
            start = event_end
    return pieces


class _Marks:
    """Where the next notable mark of a block is, from any position on: each mark is looked for again only once
    the position has passed it."""

    __slots__ = ("_block", "_marks", "_positions")

    def __init__(self, block: bytes) -> None:
        self._block = block
        self._marks = _MARKS + _SPACED_MARKS if b'": ' in block else _MARKS
        self._positions = [block.find(mark) for mark in self._marks]

    def next(self, start: int) -> int:
        """The position of the first mark at or after `start`, or the block's length."""
        nearest = len(self._block)
        positions = self._positions
        for index, position in enumerate(positions):
            if position < 0:
                continue  # not in the block at all
            if position < start:
                position = positions[index] = self._block.find(self._marks[index], start)
                if position < 0:
                    continue
            if position < nearest:
                nearest = position
        return nearest


def _add_run(pieces: list[tuple[bytes, int]], run: bytes) -> None:
    # One `data:` line per event: JSON cannot hold a raw newline, so any other newline is SSE structure. The run
    # ends with a blank line; when every other newline is in a blank line followed by `data:`, it holds `count`
    # such events.
    count = run.count(b"\n\ndata:") + 1
    if run.startswith(b"data:") and run.count(b"\n") == 2 * count:
        pieces.append((run, count))
        return
    position = 0
    while position < len(run):
        event_end = run.find(b"\n\n", position) + 2
        pieces.append((run[position:event_end], 0))
        position = event_end


def event_data(event: bytes) -> bytes | None:
    """The `data` of an event; several `data:` lines are joined with newlines, per the SSE spec."""
    if event.startswith(b"data:") and b"\ndata:" not in event:
        return event[5:].strip()
    lines = [line[5:].strip() for line in event.splitlines() if line.startswith(b"data:")]
    return b"\n".join(lines) if lines else None


def is_done(data: bytes) -> bool:
    return data == b"[DONE]"


def carries_usage(data: bytes) -> bool:
    return b'"usage"' in data and b'"usage":null' not in data and b'"usage": null' not in data


def is_usage_only(data: bytes) -> bool:
    """vLLM's and OpenAI's final usage chunk has an empty choices list."""
    return b'"choices":[]' in data or b'"choices": []' in data


def is_content(data: bytes) -> bool:
    """A chunk that carries generated text (not the role-only opener, not the usage chunk)."""
    if is_usage_only(data) or b'"error"' in data[:12]:
        return False
    if b'"delta":{}' in data or b'"delta": {}' in data:  # OpenAI's closing chunk: a finish reason, no text
        return False
    return b'"content":""' not in data and b'"text":""' not in data


def finish_reason(data: bytes) -> str | None:
    if b'"finish_reason":"' not in data and b'"finish_reason": "' not in data:
        return None
    match = _FINISH_REASON.search(data)
    return match.group(1).decode() if match else None


def usage_from_mapping(usage: object) -> Usage | None:
    if not isinstance(usage, dict):
        return None
    prompt_details = usage.get("prompt_tokens_details") or {}
    completion_details = usage.get("completion_tokens_details") or {}
    return Usage(
        prompt_tokens=_int(usage.get("prompt_tokens")),
        completion_tokens=_int(usage.get("completion_tokens")),
        cached_prompt_tokens=_int(prompt_details.get("cached_tokens")) if isinstance(prompt_details, dict) else 0,
        reasoning_tokens=(
            _int(completion_details.get("reasoning_tokens")) if isinstance(completion_details, dict) else 0
        ),
        source="backend",
    )


def usage_from_chunk(data: bytes) -> Usage | None:
    try:
        parsed = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    return usage_from_mapping(parsed.get("usage")) if isinstance(parsed, dict) else None


def _int(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def error_event(body: bytes) -> bytes:
    return b"data: " + body + b"\n\n"
