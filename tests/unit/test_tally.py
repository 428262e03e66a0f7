"""The metrics tally: batched updates expose exactly what direct prometheus-client updates would."""

from __future__ import annotations

import random

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from gateway.tally import Tally


def metrics(registry: CollectorRegistry) -> tuple[Counter, Histogram, Gauge]:
    return (
        Counter("t_requests_total", "r", ["model", "status"], registry=registry),
        Histogram("t_seconds", "s", ["model"], buckets=(0.01, 0.1, 1, 10), registry=registry),
        Gauge("t_in_flight", "f", registry=registry),
    )


def test_batched_updates_equal_direct_ones() -> None:
    direct_registry, batched_registry = CollectorRegistry(), CollectorRegistry()
    direct, batched = metrics(direct_registry), metrics(batched_registry)
    tally = Tally()
    rng = random.Random(7)
    in_flight = 0
    for step in range(2_000):
        model, status = rng.choice(["a", "b"]), rng.choice(["200", "429"])
        value = rng.choice([0.0, 0.005, 0.01, 0.05, 0.1, 3.0, 10.0, 50.0])
        direct[0].labels(model, status).inc()
        tally.count(batched[0], (model, status))
        direct[1].labels(model).observe(value)
        tally.observe(batched[1], (model,), value)
        delta = rng.choice([1, -1]) if in_flight else 1
        in_flight += delta
        direct[2].set(in_flight)
        tally.level(batched[2], (), delta)
        if step % 333 == 0:
            tally.flush()
    tally.flush()
    batched_samples, direct_samples = samples(batched_registry), samples(direct_registry)
    assert batched_samples.keys() == direct_samples.keys()
    for name, value in direct_samples.items():
        # Sums of floats added in another order differ in the last bits; everything else is exact.
        assert batched_samples[name] == pytest.approx(value, rel=1e-12), name


def samples(registry: CollectorRegistry) -> dict[str, float]:
    """Every sample but the creation times (the two sets of metrics were made a few microseconds apart)."""
    lines = generate_latest(registry).decode().splitlines()
    return {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in lines
        if not line.startswith("#") and "_created" not in line
    }
