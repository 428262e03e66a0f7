"""Load generation with wrk and `wrk_post.lua`; one run gives one `WrkResult`."""

from __future__ import annotations

import json
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from procs import BenchError

LUA_SCRIPT = Path(__file__).resolve().with_name("wrk_post.lua")
_MARKER = "BENCH_JSON "


@dataclass(frozen=True)
class Scenario:
    name: str
    threads: int
    connections: int
    stream: bool

    @property
    def unit(self) -> str:
        return "streams/s" if self.stream else "req/s"


SCENARIOS = (
    Scenario("chat c1", threads=1, connections=1, stream=False),
    Scenario("chat c32", threads=2, connections=32, stream=False),
    Scenario("stream c32", threads=2, connections=32, stream=True),
)


@dataclass(frozen=True)
class WrkResult:
    requests: int
    duration_s: float
    rps: float
    bytes: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    socket_errors: dict[str, int]  # connect, read, write, timeout
    non2xx: int
    statuses: dict[str, int]  # non-2xx responses by status code
    error_bodies: int

    @property
    def error_count(self) -> int:
        stalled = 1 if self.requests == 0 else 0  # not one response in the whole run: never a silent zero
        return sum(self.socket_errors.values()) + self.non2xx + self.error_bodies + stalled

    def describe_errors(self) -> str:
        parts = [f"{name} {count}" for name, count in self.socket_errors.items() if count]
        if self.requests == 0:
            parts.append("no response completed")
        if self.non2xx:
            codes = ", ".join(f"{code}: {count}" for code, count in sorted(self.statuses.items()))
            parts.append(f"non-2xx {self.non2xx} ({codes})")
        if self.error_bodies:
            parts.append(f"error bodies {self.error_bodies}")
        return ", ".join(parts)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def parse_wrk_output(stdout: str) -> WrkResult:
    line = next((line for line in stdout.splitlines() if line.startswith(_MARKER)), None)
    if line is None:
        raise BenchError(f"wrk printed no result line:\n{stdout[-2000:]}")
    raw = json.loads(line[len(_MARKER) :])
    latency = raw["latency_us"]
    errors = raw["errors"]
    return WrkResult(
        requests=raw["requests"],
        duration_s=raw["duration_s"],
        bytes=raw["bytes"],
        rps=raw["rps"],
        p50_ms=latency["p50"] / 1000,
        p90_ms=latency["p90"] / 1000,
        p99_ms=latency["p99"] / 1000,
        # errors.status (wrk's count of statuses >= 400) is within non2xx, which the script counts itself
        socket_errors={name: errors[name] for name in ("connect", "read", "write", "timeout")},
        non2xx=raw["non2xx"],
        statuses=raw.get("statuses", {}),
        error_bodies=raw["error_bodies"],
    )


def run_wrk(wrk: str, url: str, scenario: Scenario, *, duration: float, keys_file: Path, body_file: Path) -> WrkResult:
    command = [
        wrk,
        f"-t{scenario.threads}",
        f"-c{scenario.connections}",
        f"-d{max(1, round(duration))}s",
        "--timeout",
        "5s",
        "-s",
        str(LUA_SCRIPT),
        url,
        "--",
        str(keys_file),
        str(body_file),
    ]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=duration + 60)
    if completed.returncode != 0:
        raise BenchError(f"wrk failed ({completed.returncode}): {completed.stderr.strip() or completed.stdout[-500:]}")
    return parse_wrk_output(completed.stdout)
