"""`/metrics` of a gateway with two worker processes: after known traffic the counters add up across workers (each
worker served part of it, and the scrape is their sum), whichever worker answers the scrape."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from tests.admin.conftest import make_team_admin
from tests.harness import (
    Database,
    Gateway,
    MockBackend,
    RedisServer,
    closed_port,
    gateway_config,
    start_gateway,
    wait_for,
)

REQUESTS = 40


def scrape(gateway: Gateway) -> dict[str, float]:
    """Metric samples summed over their labels, from a fresh connection (any worker may answer)."""
    with httpx.Client() as http:
        text = http.get(f"{gateway.url}/metrics").text
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
    return totals


def worker_pids(gateway: Gateway) -> list[int]:
    """The serving workers among the supervisor's children (the other child is the ledger writer)."""
    parent = gateway.process.popen.pid
    children = [int(pid) for pid in Path(f"/proc/{parent}/task/{parent}/children").read_text().split()]
    return [pid for pid in children if b"--worker-process" in Path(f"/proc/{pid}/cmdline").read_bytes()]


def metrics_dir(pid: int) -> Path:
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    value = next(item for item in environ if item.startswith(b"PROMETHEUS_MULTIPROC_DIR="))
    return Path(value.split(b"=", 1)[1].decode())


def requests_of_worker(directory: Path, pid: int) -> float:
    """What one worker counted, read from its own multiprocess file."""
    with tempfile.TemporaryDirectory() as alone:
        shutil.copy(directory / f"counter_{pid}.db", alone)
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=alone)
        return sum(
            sample.value
            for metric in registry.collect()
            if metric.name == "gateway_requests"
            for sample in metric.samples
            if sample.name == "gateway_requests_total"
        )


@pytest.fixture
def two_workers(database: Database, mock_backend: MockBackend, tmp_path: Path) -> Iterator[Gateway]:
    # Redis of its own: other tests leave limit overrides in the shared database, and several workers enforce
    # limits only through Redis.
    redis = RedisServer(tmp_path)
    redis.start()
    config = gateway_config(database.url, mock_backend.url, **{"redis.url": redis.url})
    config["listen"]["port"] = closed_port()  # port 0 cannot be shared by two processes
    gateway = start_gateway(tmp_path, config, "--workers", "2")
    try:
        wait_for(lambda: scrape(gateway).get("gateway_workers") == 2, timeout=30, what="both workers up")
        yield gateway
    finally:
        code = gateway.stop()
        redis.stop()
        assert code == 0, gateway.log()[-3000:]
        assert "Traceback" not in gateway.log(), gateway.log()[-3000:]


def test_counters_add_up_across_two_workers(two_workers: Gateway, database: Database) -> None:
    gateway = two_workers
    tenant = make_team_admin(database)
    headers = {"Authorization": f"Bearer {tenant.member_key}"}
    wait_for(
        lambda: all(httpx.get(f"{gateway.base_url}/models", headers=headers).is_success for _ in range(6)),
        timeout=5,
        what="both workers to know the key",
    )
    before = scrape(gateway)
    prompt = completion = 0
    for index in range(REQUESTS):
        # A new connection each time, so SO_REUSEPORT spreads them over the workers.
        response = httpx.post(
            f"{gateway.base_url}/chat/completions",
            headers=headers,
            json={
                "model": "mock-small",
                "messages": [{"role": "user", "content": "count " * (index % 5 + 1)}],
                "max_tokens": 4,
            },
        )
        assert response.status_code == 200
        usage = response.json()["usage"]
        prompt, completion = prompt + usage["prompt_tokens"], completion + usage["completion_tokens"]

    # Each worker tallies its request metrics and hands them to Prometheus' files every second (and when it answers
    # a scrape itself): within a second, whichever worker answers sees every worker's counts.
    after = wait_for(
        lambda: (
            (figures := scrape(gateway))["gateway_requests_total"] - before.get("gateway_requests_total", 0) == REQUESTS
            and figures
        ),
        timeout=5,
        what="the other worker's tally to be flushed",
    )
    assert (
        after["gateway_request_duration_seconds_count"] - before.get("gateway_request_duration_seconds_count", 0)
        == REQUESTS
    )
    assert after["gateway_tokens_total"] - before.get("gateway_tokens_total", 0) == prompt + completion
    for _ in range(5):  # every worker answers the scrape with the same sums
        assert scrape(gateway)["gateway_requests_total"] == after["gateway_requests_total"]

    pids = worker_pids(gateway)
    assert len(pids) == 2
    directory = metrics_dir(pids[0])
    per_worker = [requests_of_worker(directory, pid) for pid in pids]
    assert all(count > 0 for count in per_worker), per_worker  # both served part of the traffic
    assert sum(per_worker) == after["gateway_requests_total"]
