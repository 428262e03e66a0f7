"""Does a worker's memory stay flat under sustained load? RSS sampled while one gateway answers a million requests.

    .venv/bin/python bench/memory_soak.py [--requests 1000000] [--segment 60] [--connections 32] [--no-limits]
        [--prompt-estimate bytes]

Starts nginx with canned replies, a private append-only Redis, a fresh PostgreSQL ledger with 1,000 keys and one
gateway worker in its production shape (Redis limits on every scope, the ledger writer); runs wrk in segments until
the gateway has answered `--requests`, and prints the worker's RSS after each segment. A worker that leaks grows
with the requests; a flat one levels off after warm-up (allocator arenas, connection pools, the key cache).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gateway_setup
from load import Scenario, run_wrk
from nginx_backend import start_nginx
from procs import require_tool, rss_mib
from redis_server import start_redis
from stream_probe import chat_body


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=1_000_000)
    parser.add_argument("--segment", type=float, default=60.0, help="seconds of load between two RSS samples")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--no-limits", action="store_true")
    parser.add_argument(
        "--prompt-estimate",
        choices=["cl100k-32k", "cl100k", "bytes"],
        help="limits.prompt_estimate (default: the gateway's)",
    )
    parser.add_argument("--postgres-url", default="postgresql://postgres@127.0.0.1:5432/test")
    args = parser.parse_args()
    wrk = require_tool("wrk", "apt-get install wrk")
    scenario = Scenario("soak", threads=min(2, args.connections), connections=args.connections, stream=False)
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="gw-soak-")))
        nginx = start_nginx(tmp)
        stack.callback(nginx.stop)
        redis = start_redis(tmp)
        stack.callback(redis.stop)
        database = stack.enter_context(gateway_setup.fresh_database(args.postgres_url))
        pepper = "bench-pepper-" + "s" * 24
        keys_file = tmp / "keys"
        keys_file.write_text("\n".join(gateway_setup.create_keys(database, pepper, 1000)))
        body = json.loads(chat_body(gateway_setup.CHAT_MODEL, max_tokens=64))
        body.pop("stream")
        body_file = tmp / "body.json"
        body_file.write_text(json.dumps(body))
        config = gateway_setup.gateway_config(
            database_url=database,
            pepper=pepper,
            nginx_url=nginx.url,
            mock_url=nginx.url,
            redis_url=redis.url,
            limits="off" if args.no_limits else "on",
            prompt_estimate=args.prompt_estimate,
            state_dir=tmp / "gateway",
        )
        gateway = gateway_setup.start_gateway(tmp, gateway_setup.write_config(tmp / "gateway.yaml", config), 1)
        stack.callback(gateway.service.stop)
        worker = gateway.worker_pids()[0]
        url = gateway.service.url + "/v1/chat/completions"
        print(f"{'requests':>10} {'errors':>7} {'req/s':>7} {'worker RSS MiB':>15}")
        print(f"{0:>10,} {0:>7} {'':>7} {rss_mib(worker) or 0:>15.1f}", flush=True)
        answered = errors = 0
        samples: list[tuple[int, float]] = []
        while answered < args.requests:
            result = run_wrk(wrk, url, scenario, duration=args.segment, keys_file=keys_file, body_file=body_file)
            answered += result.requests
            errors += result.error_count
            rss = rss_mib(worker) or 0.0
            samples.append((answered, rss))
            print(f"{answered:>10,} {errors:>7} {result.rps:>7,.0f} {rss:>15.1f}", flush=True)
        settled = [rss for count, rss in samples if count >= samples[0][0] * 2] or [samples[-1][1]]
        print(
            f"\nafter warm-up (from {samples[0][0]:,} requests): RSS {min(settled):.1f}-{max(settled):.1f} MiB; "
            f"last {samples[-1][1]:.1f} MiB after {answered:,} requests, {errors} errors"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
