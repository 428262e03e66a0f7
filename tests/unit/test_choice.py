"""Routing choice on made-up endpoint states: least expected wait, weights, availability, prefix affinity."""

from __future__ import annotations

import time
from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.breaker import CircuitBreaker
from gateway.routing.choice import affinity_key, choose, expected_load
from gateway.routing.monitor import apply_scrape, parse_vllm_metrics
from gateway.routing.table import DeploymentRuntime, Endpoint
from gateway.settings import Deployment, Timeouts


def endpoints(*loads: dict[str, float | None], weight: float = 1.0, kind: str = "vllm") -> list[Endpoint]:
    deployment = DeploymentRuntime(
        config=Deployment(
            name="d", kind=kind, base_urls=[f"http://10.0.0.{i}:8000/v1" for i in range(len(loads))], weight=weight
        ),
        model="m",
        timeouts=Timeouts(),
        upstream_model="m",
    )
    deployment.set_urls(deployment.config.static_urls, (3, 5.0))
    for endpoint, load in zip(deployment.endpoints, loads, strict=True):
        for name, value in load.items():
            setattr(endpoint, name, value)
    return deployment.endpoints


def test_least_waiting_worker_wins() -> None:
    workers = endpoints({"waiting": 5, "running": 2}, {"waiting": 0, "running": 8}, {"waiting": 3, "running": 0})
    assert choose(workers, now=time.monotonic(), tiebreak=0) is workers[1]


def test_requests_sent_since_the_last_scrape_count() -> None:
    workers = endpoints({"waiting": 0, "running": 0, "sent_since_scrape": 4}, {"waiting": 1, "running": 0})
    assert choose(workers, now=time.monotonic(), tiebreak=0) is workers[1]


def test_a_nearly_full_kv_cache_is_avoided() -> None:
    workers = endpoints(
        {"waiting": 0, "running": 2, "kv_cache_usage": 0.98}, {"waiting": 1, "running": 2, "kv_cache_usage": 0.3}
    )
    assert expected_load(workers[0]) > expected_load(workers[1])
    assert choose(workers, now=time.monotonic(), tiebreak=0) is workers[1]


def test_providers_are_balanced_on_outstanding_requests() -> None:
    providers = endpoints({"outstanding": 7}, {"outstanding": 2}, kind="openai")
    assert expected_load(providers[1]) == 2
    assert choose(providers, now=time.monotonic(), tiebreak=0) is providers[1]


def test_weights_divide_the_load() -> None:
    heavy = endpoints({"outstanding": 4}, weight=4.0, kind="openai")
    light = endpoints({"outstanding": 2}, weight=1.0, kind="openai")
    assert choose(heavy + light, now=time.monotonic(), tiebreak=1) is heavy[0]


@pytest.mark.parametrize("blocker", ["unhealthy", "draining", "cooling", "breaker"])
def test_unavailable_endpoints_are_skipped(blocker: str) -> None:
    workers = endpoints({"waiting": 0}, {"waiting": 9})
    if blocker == "unhealthy":
        workers[0].healthy = False
    elif blocker == "draining":
        workers[0].deployment.drained_by_admin = True
        assert choose(workers, now=time.monotonic(), tiebreak=0) is None
        return
    elif blocker == "cooling":
        workers[0].cooldown_until = time.monotonic() + 60
    else:
        workers[0].breaker = CircuitBreaker(threshold=1, cooldown=60)
        workers[0].breaker.failure()
    assert choose(workers, now=time.monotonic(), tiebreak=0) is workers[1]


def test_ties_rotate() -> None:
    workers = endpoints(*({"waiting": 0, "running": 0} for _ in range(4)))
    picks = Counter(choose(workers, now=time.monotonic(), tiebreak=tick).base_url for tick in range(400))
    assert len(picks) == 4 and min(picks.values()) == 100


def test_affinity_sticks_to_one_worker_until_it_is_overloaded() -> None:
    workers = endpoints(*({"waiting": 0, "running": 0} for _ in range(5)))
    picks = {
        choose(workers, now=time.monotonic(), tiebreak=tick, affinity_key="user-42").base_url for tick in range(50)
    }
    assert len(picks) == 1
    sticky = next(endpoint for endpoint in workers if endpoint.base_url in picks)
    sticky.waiting = 10
    moved = choose(workers, now=time.monotonic(), tiebreak=0, affinity_key="user-42")
    assert moved is not sticky


@given(keys=st.lists(st.text(min_size=1, max_size=8), min_size=50, max_size=50, unique=True))
def test_affinity_spreads_different_keys(keys: list[str]) -> None:
    workers = endpoints(*({"waiting": 0, "running": 0} for _ in range(4)))
    used = {choose(workers, now=time.monotonic(), tiebreak=0, affinity_key=key).base_url for key in keys}
    assert len(used) >= 3


def test_affinity_keys() -> None:
    assert affinity_key("user", {"user": "alice"}) == "alice"
    assert affinity_key("user", {}) is None
    one = affinity_key("prefix", {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "a"}]})
    two = affinity_key(
        "prefix",
        {
            "messages": [
                {"role": "system", "content": "S"},
                {"role": "user", "content": "a"},
                {"role": "user", "content": "later"},
            ]
        },
    )
    assert one == two
    assert affinity_key("none", {"user": "x"}) is None


def test_vllm_metrics_are_read_off_the_text() -> None:
    text = """# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="tiny"} 2.0
vllm:num_requests_waiting{engine="0",model_name="tiny"} 3.0
vllm:kv_cache_usage_perc{engine="0",model_name="tiny"} 0.25
vllm:prefix_cache_queries_total{engine="0",model_name="tiny"} 200.0
vllm:prefix_cache_hits_total{engine="0",model_name="tiny"} 50.0
vllm:prompt_tokens_total{engine="0",model_name="tiny"} 1234.0
vllm:generation_tokens_total{engine="0",model_name="tiny"} 99.0
vllm:e2e_request_latency_seconds_bucket{le="0.3",model_name="tiny"} 4.0
"""
    values = parse_vllm_metrics(text)
    (worker,) = endpoints({"sent_since_scrape": 5})
    apply_scrape(worker, values)
    assert (worker.running, worker.waiting, worker.kv_cache_usage) == (2.0, 3.0, 0.25)
    assert worker.prefix_cache_hit_rate == 0.25 and worker.prompt_tokens_total == 1234.0
    assert worker.sent_since_scrape == 0


def test_when_every_worker_fails_its_health_checks_they_are_tried_anyway() -> None:
    workers = endpoints({"waiting": 3}, {"waiting": 1})
    for worker in workers:
        worker.healthy = False
    assert choose(workers, now=time.monotonic(), tiebreak=0) is workers[1]
    workers[1].breaker = CircuitBreaker(threshold=1, cooldown=60)
    workers[1].breaker.failure()  # an open breaker stays closed to traffic even then
    assert choose(workers, now=time.monotonic(), tiebreak=0) is workers[0]
