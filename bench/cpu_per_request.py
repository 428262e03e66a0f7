"""CPU time per request in one gateway worker: a figure that holds up on a busy machine, unlike req/s.

    .venv/bin/python bench/cpu_per_request.py [--buffer redis|spool] [--limits] [--stream] [--seconds 8]
                                             [--connections 32] [--profile out.txt]

Starts nginx with canned replies, a fresh PostgreSQL ledger with 1,000 keys and one gateway worker; loads it with
wrk; reports the worker's user+system CPU seconds divided by the requests it answered (and, for reference, the
same for the bare aiohttp passthrough). `--profile` records the worker with py-spy (raw collapsed stacks) for
`bench/profile_summary.py`. Use it to measure a change before and after: the difference in µs per request is
what the change costs or saves.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gateway_setup
import nginx_backend
from procs import children_of, free_port

ROOT = Path(__file__).resolve().parents[1]
BODY = {
    "model": "bench-model",
    "messages": [{"role": "user", "content": "Hello there, how are you?"}],
    "max_tokens": 16,
}


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_ready(url: str) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/ready", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)  # poll interval while the gateway starts
    raise SystemExit("the gateway did not become ready")


def wrk_command(url: str, keys: Path, body: Path, seconds: int, connections: int, threads: int) -> list[str]:
    """wrk POSTing `body` to the chat endpoint, rotating `keys` (bench/wrk_post.lua prints one BENCH_JSON line)."""
    wrk = shutil.which("wrk") or sys.exit("wrk is not installed (apt-get install wrk)")
    return [
        wrk,
        f"-t{threads}",
        f"-c{connections}",
        f"-d{seconds}s",
        "-s",
        str(ROOT / "bench" / "wrk_post.lua"),
        url + "/v1/chat/completions",
        "--",
        str(keys),
        str(body),
    ]


def wrk_result(out: str) -> dict[str, object]:
    line = next(line for line in out.splitlines() if line.startswith("BENCH_JSON"))
    return json.loads(line.split(" ", 1)[1])  # type: ignore[no-any-return]


def run_wrk(url: str, keys: Path, body: Path, seconds: int, connections: int) -> dict[str, object]:
    command = wrk_command(url, keys, body, seconds, connections, min(connections, 2))
    return wrk_result(subprocess.run(command, capture_output=True, text=True, check=True).stdout)


def measure(
    pid: int, url: str, keys: Path, body: Path, args: argparse.Namespace, label: str, helpers: dict[str, int]
) -> None:
    """`helpers`: other processes whose CPU the request also costs (Redis, the ledger writer), shown apart."""
    spy = None
    if args.profile and label == "gateway":
        py_spy = shutil.which("py-spy", path=str(ROOT / ".venv" / "bin")) or sys.exit("pip install py-spy")
        spy = subprocess.Popen(
            [
                py_spy,
                "record",
                "-p",
                str(pid),
                "-o",
                args.profile,
                "-f",
                "raw",
                "-r",
                "200",
                "-d",
                str(args.seconds),
                "--nonblocking",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    before = cpu_seconds(pid)
    helpers_before = {name: cpu_seconds(helper) for name, helper in helpers.items()}
    result = run_wrk(url, keys, body, args.seconds, args.connections)
    used = cpu_seconds(pid) - before
    helpers_used = {name: cpu_seconds(helper) - helpers_before[name] for name, helper in helpers.items()}
    requests = int(result["requests"])  # type: ignore[call-overload]
    rss = (
        next(
            int(line.split()[1])
            for line in Path(f"/proc/{pid}/status").read_text().splitlines()
            if line.startswith("VmRSS")
        )
        / 1024
    )
    latency = result["latency_us"]
    print(
        f"{label:12} {result['rps']:8.0f} req/s  p50 {latency['p50'] / 1000:6.2f} ms  "  # type: ignore[index]
        f"p99 {latency['p99'] / 1000:7.2f} ms  CPU {used / requests * 1e6:6.0f} µs/request  "  # type: ignore[index]
        f"non-2xx {result['non2xx']}  RSS {rss:.0f} MiB"
        + "".join(f"  {name} {seconds / requests * 1e6:.0f} µs" for name, seconds in helpers_used.items())
    )
    if spy is not None:
        spy.wait()


def gateway_config(
    *,
    database: str,
    pepper: str,
    upstream: str,
    spool_dir: Path,
    redis_url: str | None,
    limits: bool,
    overrides: list[str],
) -> dict[str, Any]:
    """The gateway's configuration: `bench-model` served by `upstream`, on a free port; `overrides` are
    `SECTION.KEY=YAML`."""
    config: dict[str, Any] = {
        "listen": {"host": "127.0.0.1", "port": free_port()},
        "database": {"url": database},
        "auth": {"pepper": pepper},
        "server": {"shutdown_grace": 2},
        "metering": {"spool_dir": str(spool_dir)},
        "models": {
            "bench-model": {
                "price": {"prompt": 1, "completion": 2},
                "deployments": [{"name": "nginx", "base_url": upstream + "/v1"}],
            }
        },
    }
    if redis_url is not None:
        config["redis"] = {"url": redis_url}
    if limits:
        config["limits"] = {
            "team": {"rpm": 10**9, "tpm": 10**12, "concurrency": 10**6, "daily_tokens": 10**15},
            "key": {"rpm": 10**9},
        }
    for override in overrides:
        dotted, _, value = override.partition("=")
        *parents, leaf = dotted.split(".")
        node = config
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(value)
    return config


def gateway_url(config: dict[str, Any]) -> str:
    return f"http://127.0.0.1:{config['listen']['port']}"


def start_gateway(
    config: dict[str, Any], directory: Path, source: Path
) -> tuple[subprocess.Popen[bytes], int, dict[str, int]]:
    """`python -m gateway serve` of the code in `source` with `config` (written into `directory`, with its log),
    once ready: the process, its serving worker's pid and its helpers' (the ledger writer)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "gateway.yaml").write_text(yaml.safe_dump(config))
    gateway = subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve", "--config", str(directory / "gateway.yaml")],
        cwd=source,  # its code comes first on sys.path, before the editable install
        stdout=subprocess.DEVNULL,
        stderr=open(directory / "gateway.log", "w"),  # noqa: SIM115 - handed to the child
    )
    wait_ready(gateway_url(config))
    children = {pid: Path(f"/proc/{pid}/cmdline").read_bytes() for pid in children_of(gateway.pid)}
    worker = next(pid for pid, line in children.items() if b"--worker-process" in line)
    helpers = dict(("ledger", pid) for pid, line in children.items() if b"ledger-writer" in line)
    return gateway, worker, helpers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--buffer", choices=["redis", "spool"], default="redis")
    parser.add_argument("--limits", action="store_true", help="team and key limits on (never reached)")
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--profile", help="py-spy raw output file for the gateway worker")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=YAML",
        help="override a config value, e.g. logging.access_log=false (A/B comparisons)",
    )
    parser.add_argument("--stream", action="store_true", help="whole canned SSE streams instead of chat answers")
    parser.add_argument("--postgres-url", default="postgresql://postgres@127.0.0.1:5432/test")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="cpu-per-request-"))
    nginx = nginx_backend.start_nginx(tmp)
    redis_port = free_port()
    redis = subprocess.Popen(
        ["redis-server", "--port", str(redis_port), "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL
    )
    passthrough_port = free_port()
    passthrough = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "bench" / "passthrough.py"),
            "--port",
            str(passthrough_port),
            "--upstream",
            nginx.url,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    gateway = None
    try:
        with gateway_setup.fresh_database(args.postgres_url) as database:
            pepper = "bench-pepper-" + "x" * 24
            keys = tmp / "keys"
            keys.write_text("\n".join(gateway_setup.create_keys(database, pepper, 1000)))
            body = tmp / "body.json"
            body.write_text(json.dumps({**BODY, "stream": True} if args.stream else BODY))
            upstream = nginx.url + ("/stream" if args.stream else "")  # nginx serves canned streams there
            config = gateway_config(
                database=database,
                pepper=pepper,
                upstream=upstream,
                spool_dir=tmp / "spool",
                redis_url=f"redis://127.0.0.1:{redis_port}/0" if args.buffer == "redis" else None,
                limits=args.limits,
                overrides=args.set,
            )
            gateway, worker, helpers = start_gateway(config, tmp, ROOT)
            url = gateway_url(config)
            helpers = {"redis": redis.pid, **helpers}
            passthrough_url = f"http://127.0.0.1:{passthrough_port}" + ("/stream" if args.stream else "")
            measure(passthrough.pid, passthrough_url, keys, body, args, "passthrough", {})
            measure(worker, url, keys, body, args, "gateway", helpers)
            gateway.terminate()
            gateway.wait(60)
    finally:
        for process in (gateway, passthrough, redis):
            if process is not None and process.poll() is None:
                process.terminate()
                process.wait(30)
        nginx.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
