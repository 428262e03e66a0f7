"""Measure the gateway against the physical limit, in one interleaved run.

    .venv/bin/python bench/run.py [--duration 10] [--rounds 3] [--variants w1:limits,w2:limits,w1] [--quick]

Starts nginx with canned vLLM replies (the direct figure), a bare aiohttp passthrough (the framework floor) and
the gateway variants on a fresh PostgreSQL database with 1,000 keys (see `Variant`); runs wrk against all of them, round
after round, each scenario back to back so noise hits all alike; probes streams at one connection; reads worker
memory; checks the ledger. Prints a markdown table and writes bench/results/<UTC time>.md and .json. Everything it
starts or creates (processes, temp dir, database) is gone when it exits.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import cpu
import gateway_setup
import logscan
from gateway_setup import GatewayInstance
from load import SCENARIOS, Scenario, run_wrk
from nginx_backend import start_nginx
from procs import BenchError, Service, free_port, require_tool, rss_mib, terminate_on_sigterm
from redis_server import calls_between, command_calls, start_redis
from report import DIRECT, MOCK_DIRECT, PASSTHROUGH, Cell, MemoryRow, ProbeRow, Report, render_markdown, report_json
from source import run_at_ref, source_label
from stream_probe import Prober, StreamTiming, chat_body, summarise

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
RESULTS = BENCH / "results"
DEFAULT_POSTGRES = os.environ.get("BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
CHAT_PATH = "/v1/chat/completions"
NGINX_STREAM_PATH = "/stream/v1/chat/completions"
WARM_UP_S = 2.0
# The production shape (limits on) with 1 and 2 workers, then what each part costs: limits off, metering off,
# and 8 deployments behind the model instead of 1.
DEFAULT_VARIANTS = "w1:limits,w2:limits,w1,w1:limits:nometer,w1:limits:8dep"


@dataclass(frozen=True)
class Variant:
    """One gateway to measure. Every variant has Redis (the usage buffer, and the limits where on) and the
    PostgreSQL ledger; `nometer` sets metering.enabled false; `Kdep` puts K identical nginx deployments behind the
    benchmark model (the routing choice then has K candidates); `serial` sets limits.overlap_admission false (every
    admission before its upstream request)."""

    workers: int
    limits: bool = False
    metering: bool = True
    deployments: int = 1
    overlap: bool = True

    @classmethod
    def parse(cls, spec: str) -> Variant:
        head, *flags = spec.split(":")
        if not head.startswith("w") or not head[1:].isdigit() or int(head[1:]) < 1:
            raise ValueError(f"{spec!r}: start with wN, the worker count")
        variant = cls(int(head[1:]))
        for flag in flags:
            if flag == "limits":
                variant = dataclasses.replace(variant, limits=True)
            elif flag == "nometer":
                variant = dataclasses.replace(variant, metering=False)
            elif flag == "serial":
                variant = dataclasses.replace(variant, overlap=False)
            elif flag.endswith("dep") and flag[:-3].isdigit() and int(flag[:-3]) >= 1:
                variant = dataclasses.replace(variant, deployments=int(flag[:-3]))
            else:
                raise ValueError(f"{spec!r}: unknown flag {flag!r} (limits, nometer, serial, Kdep)")
        return variant

    @property
    def label(self) -> str:
        parts = [f"gateway w{self.workers}", "limits" if self.limits else "no limits"]
        if not self.metering:
            parts.append("no metering")
        if self.deployments > 1:
            parts.append(f"{self.deployments} deployments")
        if not self.overlap:
            parts.append("serial admission")
        return " ".join(parts)


@dataclass
class Target:
    name: str
    chat_url: str
    stream_url: str
    gateway: GatewayInstance | None = None

    def url(self, scenario: Scenario) -> str:
        return self.stream_url if scenario.stream else self.chat_url


@dataclass
class LoadFiles:
    keys: list[str]
    keys_file: Path
    chat_body: Path  # non-streaming: model bench-model
    stream_body: Path  # "stream": true, model bench-stream

    def body(self, scenario: Scenario) -> Path:
        return self.stream_body if scenario.stream else self.chat_body


# --- arguments and machine -------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per wrk run (default 10)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians are reported (default 3)")
    parser.add_argument(
        "--variants",
        default=DEFAULT_VARIANTS,
        help=f"gateways to measure, comma-separated wN[:limits][:nometer][:serial][:Kdep] (default {DEFAULT_VARIANTS})",
    )
    parser.add_argument("--quick", action="store_true", help="smoke test: 1 round of 3 s runs, fewer probe streams")
    parser.add_argument(
        "--redis-url", help="Redis for the gateway (default: a private redis-server, started when needed)"
    )
    parser.add_argument("--postgres-url", default=DEFAULT_POSTGRES, help="admin URL; a fresh database is made")
    parser.add_argument("--keys", type=int, default=1000, help="API keys rotated by the load (default 1000)")
    parser.add_argument("--ref", help="measure this committed revision (exported clean) instead of the working tree")
    parser.add_argument("--mock-tokens-per-second", type=float, default=200.0, help="pace of the mock backend")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.duration = 1, 3.0
    try:
        args.variants = [Variant.parse(item.strip()) for item in args.variants.split(",") if item.strip()]
    except ValueError as exc:
        parser.error(f"--variants: {exc}")
    if not args.variants or len({variant.label for variant in args.variants}) != len(args.variants):
        parser.error("--variants needs at least one variant, each once")
    if args.rounds < 1 or args.duration < 1 or args.keys < 1:
        parser.error("--rounds, --duration and --keys must be positive")
    return args


def _command_output(command: list[str]) -> str:
    try:
        completed = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=10)
    except OSError:
        return "unknown"
    lines = (completed.stdout + completed.stderr).strip().splitlines()  # `wrk -v` exits 1 after its version
    return lines[0] if lines else "unknown"


def _proc_value(path: str, key: str) -> str:
    with contextlib.suppress(OSError):
        for line in Path(path).read_text().splitlines():
            if line.startswith(key):
                return line.split(":", 1)[1].strip()
    return "unknown"


def machine_facts(nginx: str, wrk: str) -> dict[str, str]:
    commit = _command_output(["git", "rev-parse", "--short", "HEAD"])
    dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    return {
        "nproc": str(os.cpu_count()),
        "cpu": _proc_value("/proc/cpuinfo", "model name"),
        "arch": platform.machine(),
        "kernel": platform.release(),
        "memory": _proc_value("/proc/meminfo", "MemTotal") + " RAM",
        "python": platform.python_version(),
        "nginx": _command_output([nginx, "-v"]).removeprefix("nginx version: "),
        "wrk": " ".join(_command_output([wrk, "-v"]).split()[:2]),
        "commit": source_label() or commit + (" + uncommitted changes in the tree" if dirty else ""),
    }


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- setup -----------------------------------------------------------------------------------------------


def write_load_files(tmp: Path, keys: list[str]) -> LoadFiles:
    files = LoadFiles(keys, tmp / "keys.txt", tmp / "chat.json", tmp / "stream.json")
    files.keys_file.write_text("\n".join(keys) + "\n")
    chat = json.loads(chat_body(gateway_setup.CHAT_MODEL, max_tokens=64))
    chat.pop("stream")
    files.chat_body.write_text(json.dumps(chat))
    files.stream_body.write_bytes(chat_body(gateway_setup.STREAM_MODEL, max_tokens=64))
    return files


def start_passthrough(tmp: Path, upstream: str, name: str = "passthrough") -> Service:
    port = free_port()
    service = Service.start(
        name,
        [sys.executable, str(BENCH / "passthrough.py"), "--port", str(port), "--upstream", upstream],
        log_path=tmp / f"{name}.log",
        url=f"http://127.0.0.1:{port}",
    )
    service.wait_ready("/health", timeout=20)
    return service


def build_targets(nginx: Service, passthrough: Service, gateways: list[GatewayInstance]) -> list[Target]:
    targets = [
        Target(DIRECT, nginx.url + CHAT_PATH, nginx.url + NGINX_STREAM_PATH),
        Target(PASSTHROUGH, passthrough.url + CHAT_PATH, passthrough.url + NGINX_STREAM_PATH),
    ]
    for instance in gateways:
        url = instance.service.url + CHAT_PATH
        targets.append(Target(instance.label, url, url, gateway=instance))
    return targets


# --- load ------------------------------------------------------------------------------------------------


def metered(target: str) -> bool:
    """Whether a target's responses leave ledger rows (a gateway variant with metering on)."""
    return target.startswith("gateway") and "no metering" not in target


class Counter:
    """Responses the clients saw from the gateways, to hold against the ledger."""

    def __init__(self) -> None:
        self.gateway_responses = 0


def warm_up(wrk: str, targets: list[Target], files: LoadFiles, counter: Counter) -> None:
    for scenario in (SCENARIOS[1], SCENARIOS[2]):
        for target in targets:
            result = run_wrk(
                wrk, target.url(scenario), scenario, duration=WARM_UP_S, keys_file=files.keys_file,
                body_file=files.body(scenario),
            )  # fmt: skip
            if metered(target.name):
                counter.gateway_responses += result.requests
            if result.error_count:
                _say(f"  warm-up {scenario.name} → {target.name}: {result.describe_errors()}")


def run_rounds(wrk: str, targets: list[Target], setup: Setup, args: argparse.Namespace, counter: Counter) -> list[Cell]:
    cells = {(scenario.name, target.name): Cell(scenario, target.name) for scenario in SCENARIOS for target in targets}
    database = setup.database_url.rsplit("/", 1)[1]
    for round_index in range(args.rounds):
        for scenario in SCENARIOS:
            for target in targets:
                before = cpu.sample(database)
                result = run_wrk(
                    wrk, target.url(scenario), scenario, duration=args.duration, keys_file=setup.files.keys_file,
                    body_file=setup.files.body(scenario),
                )  # fmt: skip
                foreign = cpu.foreign_share(before, cpu.sample(database))
                cell = cells[(scenario.name, target.name)]
                cell.runs.append(result)
                cell.foreign_cpu.append(foreign)
                if metered(target.name):
                    counter.gateway_responses += result.requests
                flag = f"  ⚠ {result.describe_errors()}" if result.error_count else ""
                _say(
                    f"[round {round_index + 1}/{args.rounds}] {scenario.name:<10} → {target.name:<13} "
                    f"{result.rps:>8,.0f} {scenario.unit:<9} p50 {result.p50_ms:6.2f} ms  "
                    f"p99 {result.p99_ms:6.2f} ms  other CPU {foreign:4.0%}{flag}"
                )
    return list(cells.values())


def gateway_memory(gateways: list[GatewayInstance]) -> list[MemoryRow]:
    """RSS of every process of every gateway, workers first."""
    rows = []
    for instance in gateways:
        processes = sorted(instance.processes().items(), key=lambda item: (item[1] != "worker", item[0]))
        rows += [MemoryRow(instance.label, pid, role, rss_mib(pid)) for pid, role in processes]
    return rows


def merge_memory(before: list[MemoryRow], after: list[MemoryRow]) -> list[MemoryRow]:
    later = {row.pid: row.rss_before for row in after}
    return [MemoryRow(row.target, row.pid, row.role, row.rss_before, later.get(row.pid)) for row in before]


# --- streams at one connection ---------------------------------------------------------------------------


async def probe_interleaved(
    targets: list[tuple[str, str]], body: bytes, keys: list[str], *, batches: int, per_batch: int
) -> list[ProbeRow]:
    prober = Prober()
    timings: dict[str, list[StreamTiming]] = {name: [] for name, _ in targets}
    try:
        for name, url in targets:  # one warm-up stream each: connect, pools, caches
            await prober.run(name, url, body, keys, 1)
        for batch in range(batches):
            for name, url in targets:
                timings[name] += await prober.run(name, url, body, keys[batch * per_batch :], per_batch)
    finally:
        await prober.close()
    return [ProbeRow(name, summarise(timings[name])) for name, _ in targets]


def probe_streams(targets: list[Target], files: LoadFiles, quick: bool, counter: Counter) -> list[ProbeRow]:
    batches = 2 if quick else 8
    body = files.stream_body.read_bytes()
    pairs = [(target.name, target.stream_url) for target in targets]
    rows = asyncio.run(probe_interleaved(pairs, body, files.keys, batches=batches, per_batch=25))
    counter.gateway_responses += sum(row.summary.streams + 1 for row in rows if metered(row.target))
    return rows


def probe_paced(setup: Setup, quick: bool, counter: Counter) -> list[ProbeRow]:
    body = chat_body(gateway_setup.MOCK_MODEL, max_tokens=20)
    gateways, files = setup.gateways, setup.files
    pairs = [
        (MOCK_DIRECT, setup.mock.url + CHAT_PATH),
        (f"{PASSTHROUGH} → mock", setup.mock_passthrough.url + CHAT_PATH),
    ]
    pairs += [(f"{instance.label} → mock", instance.service.url + CHAT_PATH) for instance in gateways]
    rows = asyncio.run(probe_interleaved(pairs, body, files.keys, batches=2 if quick else 4, per_batch=5))
    counter.gateway_responses += sum(row.summary.streams + 1 for row in rows if metered(row.target))
    return rows


# --- checks ----------------------------------------------------------------------------------------------


def settled_ledger(database_url: str, timeout: float = 20.0) -> dict[int, int]:
    """Usage rows by status once the writers have flushed (two equal counts a second apart)."""
    previous: dict[int, int] | None = None
    deadline = time.monotonic() + timeout
    while True:
        current = gateway_setup.usage_by_status(database_url)
        if current == previous or time.monotonic() > deadline:
            return current
        previous = current
        time.sleep(1.0)


def keep_logs(logs: dict[str, Path], destination: Path) -> None:
    """Copies the logs out of the temp dir (which is about to go) when they hold something worth reading."""
    destination.mkdir(parents=True, exist_ok=True)
    for path in logs.values():
        if path.exists():
            shutil.copyfile(path, destination / path.name)


# --- main ------------------------------------------------------------------------------------------------


@dataclass
class Setup:
    """Everything `start_all` brought up; the ExitStack it was given takes it all down again."""

    tmp: Path
    services: list[Service]
    nginx: Service
    passthrough: Service
    mock: Service
    mock_passthrough: Service  # the floor for the paced streams
    database_url: str
    redis_url: str | None
    redis_users: list[str]  # the gateways configured with `redis.url`
    gateways: list[GatewayInstance]
    files: LoadFiles


class RedisOnDemand:
    """The Redis a gateway gets when it needs one: `--redis-url`, else a private redis-server started on first use."""

    def __init__(self, given: str | None, tmp: Path, started: Callable[[Service], Service]) -> None:
        self._given, self._tmp, self._started = given, tmp, started
        self.current: str | None = None
        self.users: list[str] = []  # labels of the gateways configured with it

    def url_for(self, label: str) -> str:
        if self.current is None:
            self.current = self._given or self._started(start_redis(self._tmp)).url
        self.users.append(label)
        return self.current


def start_gateway_instance(
    tmp: Path, variant: Variant, config_for: Callable[[str], dict[str, Any]], redis: RedisOnDemand
) -> GatewayInstance:
    redis_url = redis.url_for(variant.label)
    slug = variant.label.replace(" ", "-")
    path = gateway_setup.write_config(tmp / f"{slug}.yaml", config_for(redis_url))
    return gateway_setup.start_gateway(tmp, path, variant.workers, label=variant.label)


def start_all(args: argparse.Namespace, stack: contextlib.ExitStack) -> Setup:
    tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="gw-bench-")))
    services: list[Service] = []

    def started(service: Service) -> Service:
        services.append(service)
        stack.callback(service.stop)
        return service

    _say("starting nginx, passthrough, mock backend; creating the database and keys ...")
    nginx = started(start_nginx(tmp))
    passthrough = started(start_passthrough(tmp, nginx.url))
    mock = started(gateway_setup.start_mock(tmp, args.mock_tokens_per_second))
    mock_passthrough = started(start_passthrough(tmp, mock.url, name="passthrough-mock"))
    redis = RedisOnDemand(args.redis_url, tmp, started)
    database_url = stack.enter_context(gateway_setup.fresh_database(args.postgres_url))
    pepper = "bench-pepper-" + os.urandom(16).hex()
    files = write_load_files(tmp, gateway_setup.create_keys(database_url, pepper, args.keys))
    gateways = []
    for variant in args.variants:
        _say(f"starting {variant.label} ...")

        def config_for(redis_url: str, variant: Variant = variant) -> dict[str, Any]:
            return gateway_setup.gateway_config(
                database_url=database_url,
                pepper=pepper,
                nginx_url=nginx.url,
                mock_url=mock.url,
                redis_url=redis_url,
                limits="on" if variant.limits else "off",
                state_dir=tmp / variant.label.replace(" ", "-"),
                metering=variant.metering,
                deployments=variant.deployments,
                overlap_admission=variant.overlap,
            )

        instance = start_gateway_instance(tmp, variant, config_for, redis)
        started(instance.service)
        gateways.append(instance)
    return Setup(
        tmp,
        services,
        nginx,
        passthrough,
        mock,
        mock_passthrough,
        database_url,
        redis.current,
        redis.users,
        gateways,
        files,
    )


def _redis_calls(url: str | None) -> dict[str, int] | None:
    return command_calls(url) if url else None


def measure(args: argparse.Namespace, setup: Setup, machine: dict[str, str], started_at: str, stamp: str) -> Report:
    targets = build_targets(setup.nginx, setup.passthrough, setup.gateways)
    files, counter = setup.files, Counter()
    memory_before = gateway_memory(setup.gateways)
    redis_before = _redis_calls(setup.redis_url)
    runs = args.rounds * len(SCENARIOS) * len(targets)
    _say(f"warming up, then {runs} wrk runs of {args.duration:g} s (about {runs * args.duration / 60:.1f} min) ...")
    warm_up(wrk_path(), targets, files, counter)
    cells = run_rounds(wrk_path(), targets, setup, args, counter)
    memory_after = gateway_memory(setup.gateways)
    _say("probing streams at one connection ...")
    probes = probe_streams(targets, files, args.quick, counter)
    paced = probe_paced(setup, args.quick, counter)
    redis_after = _redis_calls(setup.redis_url)
    ledger: dict[str, Any] = {
        "by_status": settled_ledger(setup.database_url),
        "duplicates": gateway_setup.duplicate_usage_rows(setup.database_url),
        "client_responses": counter.gateway_responses,
    }
    if redis_before is not None and redis_after is not None:
        ledger["redis_calls"] = calls_between(redis_before, redis_after)
    logs = {service.name: service.log_path for service in setup.services}
    logs["nginx error.log"] = setup.tmp / "nginx" / "error.log"
    findings = logscan.scan(logs)
    logs_dir = RESULTS / f"{stamp}-logs"
    if any(findings.values()):
        keep_logs(logs, logs_dir)
    return Report(
        started_at=started_at,
        machine=machine,
        settings={
            "rounds": args.rounds,
            "duration_s": args.duration,
            "variants": [variant.label for variant in args.variants],
            "redis": redis_note(args, setup),
            "keys": args.keys,
            "mock_tokens_per_second": args.mock_tokens_per_second,
            "quick": args.quick,
        },
        cells=cells,
        probes=probes,
        paced_probes=paced,
        memory=merge_memory(memory_before, memory_after),
        ledger=ledger,
        log_findings=findings,
        logs_kept=str(logs_dir.relative_to(ROOT)) if any(findings.values()) else None,
    )


def redis_note(args: argparse.Namespace, setup: Setup) -> str:
    if not setup.redis_users:
        return "none"
    source = "the given --redis-url" if args.redis_url else "a private redis-server"
    return f"{source} for every gateway (the usage buffer; the limits where on), append-only"


def wrk_path() -> str:
    return require_tool("wrk", "install Debian's wrk (apt-get install wrk)")


def write_results(report: Report, stamp: str) -> tuple[Path, Path]:
    RESULTS.mkdir(parents=True, exist_ok=True)
    markdown, record = RESULTS / f"{stamp}.md", RESULTS / f"{stamp}.json"
    markdown.write_text(render_markdown(report))
    record.write_text(json.dumps(report_json(report), indent=2, default=str) + "\n")
    return markdown, record


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.ref:
        try:
            return run_at_ref(args.ref, sys.argv[1:] if argv is None else argv)
        except BenchError as exc:
            print(f"bench: {exc}", file=sys.stderr)
            return 2
    now = datetime.now(UTC)
    started_at = now.strftime("%Y-%m-%d %H:%M:%SZ")
    stamp = now.strftime("%Y%m%dT%H%M%SZ")
    try:
        machine = machine_facts(
            require_tool("nginx", "install Debian's nginx (apt-get install nginx-light)"), wrk_path()
        )
        with terminate_on_sigterm(), contextlib.ExitStack() as stack:
            report = measure(args, start_all(args, stack), machine, started_at, stamp)
            _say("stopping everything and dropping the database ...")
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bench: interrupted; cleaned up", file=sys.stderr)
        return 130
    markdown, record = write_results(report, stamp)
    print(render_markdown(report))
    _say(f"wrote {markdown.relative_to(ROOT)} and {record.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
