"""The `x-ratelimit-*`, `retry-after` and `x-should-retry` headers, in the formats OpenAI (and so its SDK) uses."""

from __future__ import annotations

import math


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


def window_headers(kind: str, limit: int, remaining: int, reset_ms: int) -> dict[str, str]:
    return {
        f"x-ratelimit-limit-{kind}": str(limit),
        f"x-ratelimit-remaining-{kind}": str(max(0, remaining)),
        f"x-ratelimit-reset-{kind}": duration(reset_ms),
    }
