"""Many long streams at once: N slow streams held open through the gateway, and the memory that takes.

    .venv/bin/python bench/many_streams.py [--streams 10000] [--workers 2] [--hold 20]

Starts the mock backend (several workers, one token every few seconds, so streams stay open), a gateway with
`--workers` workers (Redis buffer, PostgreSQL ledger), and a client process that opens the streams in waves, waits
for each one's first event, and holds them all for `--hold` seconds. Reports how many streams were open at once,
how many failed, and the resident memory of every gateway process. One process cannot hold 20,000 sockets here
(the open-file hard limit is 20,000, and each stream takes two in a worker: client and upstream), so 10,000
streams need at least two workers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gateway_setup
from procs import children_of, free_port, rss_mib

ROOT = Path(__file__).resolve().parents[1]


async def hold_streams(url: str, key: str, count: int, hold: float) -> dict[str, float]:
    """The client side (run in its own process): open `count` streams, keep them all open `hold` seconds."""
    import aiohttp

    first_events = 0
    failures: list[str] = []
    everyone_open = asyncio.Event()
    release = asyncio.Event()
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    body = {
        "model": "slow",
        "messages": [{"role": "user", "content": "take your time"}],
        "stream": True,
        "max_tokens": 100,
    }

    async def one(session: aiohttp.ClientSession) -> None:
        nonlocal first_events
        try:
            async with session.post(url, json=body, headers={"Authorization": f"Bearer {key}"}) as response:
                if response.status != 200:
                    failures.append(f"status {response.status}")
                    return
                await response.content.readuntil(b"\n\n")
                first_events += 1
                if first_events == count:
                    everyone_open.set()
                await release.wait()
        except Exception as exc:  # a failure is a figure of the benchmark, not a crash of it
            failures.append(type(exc).__name__)
        finally:
            if first_events + len(failures) >= count:
                everyone_open.set()

    timeout = aiohttp.ClientTimeout(total=None, sock_read=300)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        tasks = []
        for start in range(0, count, 500):  # waves, so the listen backlogs are not overrun
            tasks += [asyncio.create_task(one(session)) for _ in range(min(500, count - start))]
            await asyncio.sleep(0.25)
        started = time.monotonic()
        await asyncio.wait_for(everyone_open.wait(), timeout=300)
        ramp = time.monotonic() - started
        print(json.dumps({"open": first_events, "failures": len(failures), "ramp_s": ramp}), flush=True)
        await asyncio.sleep(hold)  # the streams are held open: what is measured is the gateway meanwhile
        release.set()
        await asyncio.gather(*tasks)
    kinds: dict[str, int] = {}
    for failure in failures:
        kinds[failure] = kinds.get(failure, 0) + 1
    return {"open": first_events, "failures": len(failures), "failure_kinds": kinds}  # type: ignore[dict-item]


def client_main(url: str, key: str, count: int, hold: float) -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    print(json.dumps(asyncio.run(hold_streams(url, key, count, hold))), flush=True)


def gateway_rss(pid: int) -> dict[str, float]:
    figures = {"supervisor": rss_mib(pid) or 0.0}
    for child in children_of(pid):
        cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
        role = "writer" if b"ledger-writer" in cmdline else f"worker {child}"
        figures[role] = rss_mib(child) or 0.0
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=10_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--hold", type=float, default=20.0)
    parser.add_argument("--postgres-url", default="postgresql://postgres@127.0.0.1:5432/test")
    parser.add_argument("--client", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        url, key, count, hold = args.client
        client_main(url, key, int(count), float(hold))
        return

    tmp = Path(tempfile.mkdtemp(prefix="many-streams-"))
    processes: list[subprocess.Popen[bytes]] = []
    try:
        mock_port, redis_port, port = free_port(), free_port(), free_port()
        processes.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "backends.mock",
                    "--port",
                    str(mock_port),
                    "--workers",
                    "2",
                    "--models",
                    "slow",
                    "--tokens-per-second",
                    "0.2",
                    "--max-num-seqs",
                    str(args.streams + 100),
                ],
                cwd=ROOT,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        processes.append(
            subprocess.Popen(
                ["redis-server", "--port", str(redis_port), "--save", "", "--appendonly", "no"],
                stdout=subprocess.DEVNULL,
            )
        )
        with gateway_setup.fresh_database(args.postgres_url) as database:
            pepper = "bench-pepper-" + "x" * 24
            key = gateway_setup.create_keys(database, pepper, 1)[0]
            per_worker = args.streams // args.workers + 1000
            config = {
                "listen": {"host": "127.0.0.1", "port": port},
                "database": {"url": database},
                "redis": {"url": f"redis://127.0.0.1:{redis_port}/0"},
                "auth": {"pepper": pepper},
                "server": {"shutdown_grace": 5, "backlog": 4096},
                "timeouts": {"connect": 30, "first_byte": 60, "idle": 120},
                "metering": {"spool_dir": str(tmp / "spool")},
                "models": {
                    "slow": {
                        "price": {"prompt": 1, "completion": 1},
                        "deployments": [
                            {"name": "mock", "base_url": f"http://127.0.0.1:{mock_port}/v1", "pool_size": per_worker}
                        ],
                    }
                },
            }
            (tmp / "gateway.yaml").write_text(yaml.safe_dump(config))
            gateway = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "gateway",
                    "serve",
                    "--config",
                    str(tmp / "gateway.yaml"),
                    "--workers",
                    str(args.workers),
                ],
                cwd=ROOT,
                stdout=subprocess.DEVNULL,
                stderr=open(tmp / "gateway.log", "w"),  # noqa: SIM115
                preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (20_000, 20_000)),
            )
            processes.append(gateway)
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                try:
                    if httpx.get(url + "/ready", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.2)  # poll interval while the gateway starts
            before = gateway_rss(gateway.pid)
            client = subprocess.Popen(
                [
                    sys.executable,
                    __file__,
                    "--client",
                    url + "/v1/chat/completions",
                    key,
                    str(args.streams),
                    str(args.hold),
                ],
                stdout=subprocess.PIPE,
                text=True,
            )
            assert client.stdout is not None
            opened = json.loads(client.stdout.readline())
            during = gateway_rss(gateway.pid)
            final = json.loads(client.stdout.readline())
            client.wait()
            print(
                f"streams asked: {args.streams}; open at once: {opened['open']} (after a {opened['ramp_s']:.1f} s "
                f"ramp); failures: {final['failures']} {final['failure_kinds']}"
            )
            print("| process | RSS before (MiB) | RSS with the streams open (MiB) |")
            print("|---|---|---|")
            for role in during:
                print(f"| {role} | {before.get(role, 0):.0f} | {during[role]:.0f} |")
            print(f"| **all gateway processes** | {sum(before.values()):.0f} | **{sum(during.values()):.0f}** |")
            gateway.terminate()
            gateway.wait(60)
    finally:
        for process in processes:
            if process.poll() is None:
                process.terminate()
                process.wait(30)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
