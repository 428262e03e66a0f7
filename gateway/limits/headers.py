"""The `x-ratelimit-*`, `retry-after` and `x-should-retry` headers, in the formats OpenAI (and so its SDK) uses."""

from __future__ import annotations

import functools
import math


@functools.lru_cache(maxsize=1024)  # a window's reset is the same for every request: format it once
def duration(ms: int) -> str:
    """OpenAI's reset format: `20ms`, `1.5s`, `6m0s`, `1h2m3s`."""
    ms = max(0, int(ms))
    if ms < 1000:
        return f"{ms}ms"
    seconds = ms / 1000
    if seconds < 60:
        text = f"{seconds:.3f}".rstrip("0").rstrip(".")
        return f"{text}s"
    whole = int(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return (f"{hours}h" if hours else "") + f"{minutes}m{secs}s"


def retry_headers(retry_ms: int, *, should_retry: bool) -> dict[str, str]:
    headers = {"x-should-retry": "true" if should_retry else "false"}
    if retry_ms >= 0:
        headers["retry-after-ms"] = str(int(retry_ms))
        headers["retry-after"] = str(max(1, math.ceil(retry_ms / 1000)))
    return headers


_NAMES = {
    kind: (f"x-ratelimit-limit-{kind}", f"x-ratelimit-remaining-{kind}", f"x-ratelimit-reset-{kind}")
    for kind in ("requests", "tokens")
}


def window_headers(kind: str, limit: int, remaining: int, reset_ms: int) -> dict[str, str]:
    headers: dict[str, str] = {}
    add_window_headers(headers, kind, limit, remaining, reset_ms)
    return headers


def add_window_headers(headers: dict[str, str], kind: str, limit: int, remaining: int, reset_ms: int) -> None:
    limit_name, remaining_name, reset_name = _NAMES[kind]
    headers[limit_name] = str(limit)
    headers[remaining_name] = str(max(0, remaining))
    headers[reset_name] = duration(reset_ms)
