"""Streaming detail at one connection: time to the first SSE event, and the mean gap between events.

Opens streams one after another on a single keep-alive connection and times every `data:` event as its bytes
arrive. A stream that does not end with `data: [DONE]`, carries an error event or answers non-200 is counted
as failed.

    python bench/stream_probe.py URL --count 50 [--key sk-gw-...] [--model bench-stream] [--max-tokens 20]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import aiohttp


@dataclass
class StreamTiming:
    ok: bool
    ttfb_ms: float | None = None  # request sent -> first `data:` event
    gaps_ms: list[float] = field(default_factory=list)  # between consecutive `data:` events
    events: int = 0
    failure: str | None = None  # why the stream does not count (status, no [DONE], error event, exception)


@dataclass
class ProbeSummary:
    streams: int
    failed: int
    ttfb_p50_ms: float | None
    ttfb_p90_ms: float | None
    mean_gap_ms: float | None
    events_per_stream: float | None
    failures: dict[str, int]

    def to_json(self) -> dict[str, Any]:
        return self.__dict__.copy()


def chat_body(model: str, *, max_tokens: int) -> bytes:
    return json.dumps(
        {
            "model": model,
            "messages": [
                {"role": "system", "content": "You are a concise assistant."},
                {"role": "user", "content": "Write a haiku about load balancers."},
            ],
            "max_tokens": max_tokens,
            "temperature": 0.7,
            "stream": True,
        }
    ).encode()


async def one_stream(session: aiohttp.ClientSession, url: str, body: bytes, headers: dict[str, str]) -> StreamTiming:
    started = time.perf_counter()
    arrivals: list[float] = []
    buffer = b""
    done = failed = False
    async with session.post(url, data=body, headers=headers) as response:
        if response.status != 200:
            await response.read()
            return StreamTiming(ok=False, failure=f"status {response.status}")
        async for chunk in response.content.iter_any():
            now = time.perf_counter()
            buffer += chunk
            *events, buffer = buffer.split(b"\n\n")
            for event in events:
                if not event.startswith(b"data:"):
                    continue
                data = event[5:].strip()
                if data == b"[DONE]":
                    done = True
                    continue
                failed = failed or data.startswith(b'{"error"')
                arrivals.append(now)
    if not arrivals:
        return StreamTiming(ok=False, failure="no events")
    gaps = [(later - earlier) * 1000 for earlier, later in itertools.pairwise(arrivals)]
    failure = "error event" if failed else None if done else "no [DONE]"
    return StreamTiming(
        ok=failure is None,
        ttfb_ms=(arrivals[0] - started) * 1000,
        gaps_ms=gaps,
        events=len(arrivals),
        failure=failure,
    )


def summarise(timings: list[StreamTiming]) -> ProbeSummary:
    good = [timing for timing in timings if timing.ok]
    ttfbs = sorted(timing.ttfb_ms for timing in good if timing.ttfb_ms is not None)
    gaps = [statistics.fmean(timing.gaps_ms) for timing in good if timing.gaps_ms]
    return ProbeSummary(
        streams=len(timings),
        failed=len(timings) - len(good),
        ttfb_p50_ms=_percentile(ttfbs, 50),
        ttfb_p90_ms=_percentile(ttfbs, 90),
        mean_gap_ms=statistics.fmean(gaps) if gaps else None,
        events_per_stream=statistics.fmean(timing.events for timing in good) if good else None,
        failures=dict(Counter(timing.failure for timing in timings if timing.failure).most_common()),
    )


def _percentile(ordered: list[float], percent: float) -> float | None:
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, round(percent / 100 * (len(ordered) - 1)))]


class Prober:
    """One keep-alive connection per target, kept across batches so interleaved batches reuse it."""

    def __init__(self) -> None:
        self._sessions: dict[str, aiohttp.ClientSession] = {}

    def _session(self, target: str) -> aiohttp.ClientSession:
        if target not in self._sessions:
            self._sessions[target] = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=1), timeout=aiohttp.ClientTimeout(total=60)
            )
        return self._sessions[target]

    async def run(self, target: str, url: str, body: bytes, keys: list[str], count: int) -> list[StreamTiming]:
        session = self._session(target)
        timings = []
        for index in range(count):
            headers = {"Content-Type": "application/json"}
            if keys:
                headers["Authorization"] = f"Bearer {keys[index % len(keys)]}"
            try:
                timings.append(await one_stream(session, url, body, headers))
            except (aiohttp.ClientError, TimeoutError) as exc:
                timings.append(StreamTiming(ok=False, failure=type(exc).__name__))
        return timings

    async def close(self) -> None:
        for session in self._sessions.values():
            await session.close()


async def _main(args: argparse.Namespace) -> None:
    prober = Prober()
    try:
        body = chat_body(args.model, max_tokens=args.max_tokens)
        keys = [args.key] if args.key else []
        await prober.run("warm-up", args.url, body, keys, 1)
        timings = await prober.run("probe", args.url, body, keys, args.count)
    finally:
        await prober.close()
    print(json.dumps(summarise(timings).to_json()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("url", help="full URL, e.g. http://127.0.0.1:8080/v1/chat/completions")
    parser.add_argument("--count", type=int, default=50)
    parser.add_argument("--key", help="API key (Bearer)")
    parser.add_argument("--model", default="bench-stream")
    parser.add_argument("--max-tokens", type=int, default=20)
    asyncio.run(_main(parser.parse_args()))


if __name__ == "__main__":
    main()
