"""How much of the machine's CPU went to work that is not the benchmark's: the noise indicator per round.

Ours: this process and everything below it (services, gateway workers, nginx workers, wrk runs: reaped children
count through cutime/cstime), plus the PostgreSQL backends serving the benchmark's database. Everything else that
kept a CPU busy (other people's tests, hypervisor steal) is foreign.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

_TICK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class CpuSample:
    at: float
    busy_s: float  # all CPUs: user + nice + system + steal
    ours_s: float


def _machine_busy_seconds() -> float:
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, _irq, _softirq, steal = (int(value) for value in fields[:8])
    # irq/softirq time (loopback networking: ~10% under wrk) is charged to no process, so it is left out on both sides
    return (user + nice + system + steal) / _TICK


def _stat(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()  # fields from `state` on; the name may hold spaces


def _processes() -> dict[int, list[str]]:
    table = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (fields := _stat(int(entry.name))) is not None:
            table[int(entry.name)] = fields
    return table


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _ours_seconds(database: str | None) -> float:
    table = _processes()
    me = os.getpid()
    children: dict[int, list[int]] = {}
    for pid, fields in table.items():
        children.setdefault(int(fields[1]), []).append(pid)  # fields[1]: ppid
    total = 0.0
    pending = [me]
    while pending:
        pid = pending.pop()
        stat = table.get(pid)
        if stat is None:
            continue
        utime, stime, cutime, cstime = (int(value) for value in stat[11:15])
        # reaped children are in cutime/cstime of whoever waited for them: count those only for us (wrk runs)
        total += utime + stime + (cutime + cstime if pid == me else 0)
        pending += children.get(pid, [])
    if database:
        for pid, fields in table.items():
            if database in _cmdline(pid):  # "postgres: postgres gw_bench_... 127.0.0.1(...) idle"
                total += int(fields[11]) + int(fields[12])
    return total / _TICK


def sample(database: str | None) -> CpuSample:
    return CpuSample(at=time.monotonic(), busy_s=_machine_busy_seconds(), ours_s=_ours_seconds(database))


def foreign_share(start: CpuSample, end: CpuSample) -> float:
    """The share of all CPUs' time, between two samples, that other work kept busy (0..1)."""
    capacity = (end.at - start.at) * (os.cpu_count() or 1)
    if capacity <= 0:
        return 0.0
    return max(0.0, (end.busy_s - start.busy_s) - (end.ours_s - start.ours_s)) / capacity
