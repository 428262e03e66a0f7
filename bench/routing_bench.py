"""The routing decision's cost per request: `gateway.routing.choice.choose` over 1 to 64 endpoints.

    .venv/bin/python bench/routing_bench.py

Endpoints carry made-up vLLM figures (running, waiting, KV cache use), as the scraper would leave them; half the
runs use prefix affinity. This is the pure decision; the gateway's whole overhead per request is measured by
`bench/run.py` and `bench/cpu_per_request.py`.
"""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gateway.routing.choice import choose
from gateway.routing.table import DeploymentRuntime, Endpoint
from gateway.settings import Deployment, Timeouts


def endpoints(count: int, rng: random.Random) -> list[Endpoint]:
    deployment = DeploymentRuntime(
        config=Deployment(name="pool", base_urls=[f"http://10.0.{i // 250}.{i % 250}:8000/v1" for i in range(count)]),
        model="m",
        timeouts=Timeouts(),
        upstream_model="m",
    )
    deployment.set_urls(deployment.config.static_urls, (3, 5.0))
    for endpoint in deployment.endpoints:
        endpoint.running = float(rng.randint(0, 64))
        endpoint.waiting = float(rng.randint(0, 8))
        endpoint.kv_cache_usage = rng.random()
    return deployment.endpoints


def per_decision_us(candidates: list[Endpoint], affinity: bool, rounds: int) -> float:
    keys = [f"user-{index}" for index in range(256)]
    now = time.monotonic()
    started = time.perf_counter()
    for tick in range(rounds):
        choose(candidates, now=now, tiebreak=tick, affinity_key=keys[tick & 255] if affinity else None)
    return (time.perf_counter() - started) / rounds * 1e6


def main() -> None:
    rng = random.Random(42)
    print("| endpoints | µs per decision | with prefix affinity |")
    print("|---|---|---|")
    for count in (1, 2, 8, 32, 64):
        candidates = endpoints(count, rng)
        rounds = 200_000 // count + 1000
        plain = min(per_decision_us(candidates, False, rounds) for _ in range(3))
        affine = min(per_decision_us(candidates, True, rounds) for _ in range(3))
        print(f"| {count} | {plain:.2f} | {affine:.2f} |")


if __name__ == "__main__":
    main()
