"""Choosing an endpoint: pure functions of the endpoints' known state, so they are easy to test.

The expected wait at a vLLM worker grows with its queue (`vllm:num_requests_waiting`), what this process sent it
since the last scrape, how busy it already is, and how full its KV cache is (a full cache means preemption and
recomputation). Providers expose no such figures: their load is what this process has in flight there. Scores are
divided by the deployment's weight. Prefix affinity (same `user`, or same leading messages) keeps related requests
on one worker, to use vLLM's prefix cache, unless that worker is overloaded compared with the best one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from gateway.routing.table import Endpoint

RUNNING_WEIGHT = 0.25  # a running sequence slows a newcomer far less than a queued one delays it
KV_PRESSURE_START = 0.8  # KV cache use above this starts to cost
KV_PRESSURE_WEIGHT = 10.0
AFFINITY_SLACK = 2.0  # how much more loaded the affine worker may be than the best before we move away


def expected_load(endpoint: Endpoint) -> float:
    if endpoint.waiting is None and endpoint.running is None:
        return float(endpoint.outstanding)
    load = (endpoint.waiting or 0.0) + endpoint.sent_since_scrape + RUNNING_WEIGHT * (endpoint.running or 0.0)
    kv = endpoint.kv_cache_usage or 0.0
    if kv > KV_PRESSURE_START:
        load += KV_PRESSURE_WEIGHT * (kv - KV_PRESSURE_START) / (1 - KV_PRESSURE_START)
    return load


def score(endpoint: Endpoint) -> float:
    return expected_load(endpoint) / endpoint.deployment.config.weight


def _rendezvous(affinity_key: str, endpoint: Endpoint) -> int:
    digest = hashlib.blake2b(f"{affinity_key}\0{endpoint.key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def choose(
    candidates: Sequence[Endpoint], *, now: float, tiebreak: int, affinity_key: str | None = None
) -> Endpoint | None:
    """The endpoint to try next, or None if none is available now."""
    eligible = [endpoint for endpoint in candidates if endpoint.available(now)]
    if not eligible:
        eligible = [endpoint for endpoint in candidates if endpoint.available(now, panic=True)]
    if not eligible:
        return None
    count = len(eligible)
    best = eligible[tiebreak % count]
    best_score = score(best)
    for offset in range(1, count):
        candidate = eligible[(tiebreak + offset) % count]
        candidate_score = score(candidate)
        if candidate_score < best_score:
            best, best_score = candidate, candidate_score
    if affinity_key is None or count == 1:
        return best
    affine = max(eligible, key=lambda endpoint: _rendezvous(affinity_key, endpoint))
    return affine if score(affine) <= best_score + AFFINITY_SLACK else best


def affinity_key(mode: str, payload: dict[str, object]) -> str | None:
    """What ties related requests together: the end user, or the first messages (the shared prompt prefix)."""
    if mode == "user":
        user = payload.get("user")
        return user if isinstance(user, str) and user else None
    if mode == "prefix":
        messages = payload.get("messages")
        if isinstance(messages, list) and messages:
            return repr(messages[:2])[:4096]
        prompt = payload.get("prompt")
        if isinstance(prompt, str):
            return prompt[:1024]
    return None
