"""Turning measurements into the markdown table and the JSON record."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any

from load import Scenario, WrkResult
from redis_server import SCRIPT_COMMANDS
from stream_probe import ProbeSummary

DIRECT = "direct nginx"
PASSTHROUGH = "passthrough"
MOCK_DIRECT = "mock direct"


@dataclass
class Cell:
    """One scenario against one target, every round."""

    scenario: Scenario
    target: str
    runs: list[WrkResult] = field(default_factory=list)
    foreign_cpu: list[float] = field(default_factory=list)  # per run: share of all CPUs other work kept busy

    def median(self, attribute: str) -> float:
        return float(statistics.median(getattr(run, attribute) for run in self.runs))

    @property
    def errors(self) -> int:
        return sum(run.error_count for run in self.runs)

    def error_notes(self) -> list[str]:
        return [
            f"{self.scenario.name} → {self.target}, round {index + 1}: {run.describe_errors()} "
            f"of {run.requests} responses"
            for index, run in enumerate(self.runs)
            if run.error_count
        ]


@dataclass
class ProbeRow:
    target: str
    summary: ProbeSummary


@dataclass
class MemoryRow:
    target: str
    pid: int
    role: str  # worker, supervisor, ledger-writer, ...
    rss_before: float | None  # MiB, before the load
    rss_after: float | None = None


@dataclass
class Report:
    started_at: str
    machine: dict[str, str]
    settings: dict[str, Any]
    cells: list[Cell]
    probes: list[ProbeRow]
    paced_probes: list[ProbeRow]
    memory: list[MemoryRow]
    ledger: dict[str, Any]
    log_findings: dict[str, dict[str, int]]
    logs_kept: str | None = None


# --- numbers ---------------------------------------------------------------------------------------------


def _find(cells: list[Cell], scenario: Scenario, target: str) -> Cell | None:
    return next((cell for cell in cells if cell.scenario == scenario and cell.target == target), None)


def cell_figures(cells: list[Cell], cell: Cell) -> dict[str, Any]:
    direct = _find(cells, cell.scenario, DIRECT)
    passthrough = _find(cells, cell.scenario, PASSTHROUGH)
    rps = cell.median("rps")
    figures: dict[str, Any] = {
        "rps": rps,
        "rps_min": min(run.rps for run in cell.runs),
        "rps_max": max(run.rps for run in cell.runs),
        "p50_ms": cell.median("p50_ms"),
        "p90_ms": cell.median("p90_ms"),
        "p99_ms": cell.median("p99_ms"),
        "added_p50_ms": None,
        "added_p99_ms": None,
        "pct_of_passthrough": None,
        "errors": cell.errors,
        "other_cpu": statistics.median(cell.foreign_cpu) if cell.foreign_cpu else None,
    }
    if direct is not None and cell.target != DIRECT:
        figures["added_p50_ms"] = figures["p50_ms"] - direct.median("p50_ms")
        figures["added_p99_ms"] = figures["p99_ms"] - direct.median("p99_ms")
    if passthrough is not None and passthrough.median("rps") > 0:
        figures["pct_of_passthrough"] = 100 * rps / passthrough.median("rps")
    return figures


# --- formatting ------------------------------------------------------------------------------------------


def _ms(value: float | None, *, signed: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:+.2f}" if signed else f"{value:.2f}"


NOISY = 0.10  # other work above this share of the CPUs makes a figure doubtful


def _share(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.0%}" + (" ⚠" if value > NOISY else "")


def _noise_line(cells: list[Cell]) -> str:
    shares = [share for cell in cells for share in cell.foreign_cpu]
    if not shares:
        return "- other work on the machine: not measured"
    mean, worst = statistics.fmean(shares), max(shares)
    verdict = "quiet" if worst <= NOISY else "⚠ busy: other processes competed for the CPUs, figures are doubtful"
    return (
        f"- other work on the machine during the load: {mean:.0%} of all CPU time on average, {worst:.0%} in the "
        f"worst run ({verdict}; the `other CPU` column is the median per row)"
    )


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def load_table(cells: list[Cell]) -> list[str]:
    rows = []
    for cell in cells:
        figures = cell_figures(cells, cell)
        flag = " ⚠" if figures["errors"] else ""
        pct = figures["pct_of_passthrough"]
        rows.append(
            [
                f"{cell.scenario.name} ({cell.scenario.unit})",
                cell.target,
                f"**{figures['rps']:,.0f}**{flag}",
                f"{figures['rps_min']:,.0f}-{figures['rps_max']:,.0f}",
                _ms(figures["p50_ms"]),
                _ms(figures["p90_ms"]),
                _ms(figures["p99_ms"]),
                _ms(figures["added_p50_ms"], signed=True),
                _ms(figures["added_p99_ms"], signed=True),
                "-" if pct is None else f"{pct:.0f}%",
                f"**{figures['errors']:,}** ⚠" if figures["errors"] else "0",
                _share(figures["other_cpu"]),
            ]
        )
    header = ["scenario", "target", "rate", "range (min-max)", "p50 ms", "p90 ms", "p99 ms", "+p50 vs direct",
              "+p99 vs direct", "% of passthrough", "errors", "other CPU"]  # fmt: skip
    return _table(header, rows)


def probe_table(probes: list[ProbeRow], baseline: str) -> list[str]:
    direct = next((row.summary for row in probes if row.target == baseline), None)
    rows = []
    for row in probes:
        summary = row.summary
        added = None
        gap_change = None
        if direct is not None and row.summary is not direct:
            if summary.ttfb_p50_ms is not None and direct.ttfb_p50_ms is not None:
                added = summary.ttfb_p50_ms - direct.ttfb_p50_ms
            if summary.mean_gap_ms is not None and direct.mean_gap_ms is not None:
                gap_change = summary.mean_gap_ms - direct.mean_gap_ms
        rows.append(
            [
                row.target,
                str(summary.streams),
                _ms(summary.ttfb_p50_ms),
                _ms(summary.ttfb_p90_ms),
                _ms(added, signed=True),
                _ms(summary.mean_gap_ms),
                _ms(gap_change, signed=True),
                "-" if summary.events_per_stream is None else f"{summary.events_per_stream:.1f}",
                f"**{summary.failed}** ⚠" if summary.failed else "0",
            ]
        )
    header = ["target", "streams", "TTFB p50 ms", "TTFB p90 ms", "+TTFB p50 vs direct", "mean gap ms",
              "gap change ms", "events/stream", "failed"]  # fmt: skip
    return _table(header, rows)


def _mib(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def memory_table(memory: list[MemoryRow]) -> list[str]:
    rows = [[row.target, row.role, str(row.pid), _mib(row.rss_before), _mib(row.rss_after)] for row in memory]
    return _table(["target", "process", "pid", "RSS before load (MiB)", "RSS after load (MiB)"], rows)


def render_markdown(report: Report) -> str:
    machine, settings = report.machine, report.settings
    lines = [
        f"# Gateway benchmark, {report.started_at}",
        "",
        f"- machine: {machine['nproc']} x {machine['cpu']} ({machine['arch']}, Linux {machine['kernel']}), "
        f"{machine['memory']}",
        f"- software: Python {machine['python']}, {machine['nginx']}, {machine['wrk']}",
        f"- commit: `{machine['commit']}`",
        f"- run: {settings['rounds']} round(s) x {settings['duration_s']} s per run, targets interleaved "
        f"within each round; figures are medians over rounds; {settings['keys']:,} API keys rotated; "
        "gateway ledger on PostgreSQL",
        f"- variants: {', '.join(settings['variants'])}; Redis: {settings['redis']}",
        "- wrk on the same machine: `chat c1` = `-t1 -c1`, `chat c32` / `stream c32` = `-t2 -c32` "
        "(a stream is one whole SSE response)",
        _noise_line(report.cells),
        "",
        "## Throughput and latency",
        "",
        *load_table(report.cells),
        "",
        "## Streaming at one connection (canned nginx stream, sent at once)",
        "",
        *probe_table(report.probes, DIRECT),
        "",
    ]
    if report.paced_probes:
        lines += [
            f"## Paced streams (mock backend, {settings['mock_tokens_per_second']:g} tokens/s)",
            "",
            *probe_table(report.paced_probes, MOCK_DIRECT),
            "",
        ]
    lines += ["## Memory per gateway process", "", *memory_table(report.memory), ""]
    lines += ["## Checks", "", *_checks(report), ""]
    return "\n".join(lines)


def _checks(report: Report) -> list[str]:
    ledger = report.ledger
    by_status = ", ".join(f"{status}: {count:,}" for status, count in sorted(ledger["by_status"].items())) or "none"
    lines = [
        f"- ledger rows by status: {by_status}; responses the clients counted from the metered gateways: "
        f"{ledger['client_responses']:,} (rows may exceed this by requests cut off when wrk stops: status 499)"
    ]
    if ledger.get("duplicates"):
        lines.append(f"- ⚠ ledger: {ledger['duplicates']:,} rows repeat a request id already in the ledger")
    if "redis_calls" in ledger:
        lines.append(_redis_line(ledger["redis_calls"], ledger["client_responses"]))
    notes = [note for cell in report.cells for note in cell.error_notes()]
    for row in [*report.probes, *report.paced_probes]:
        if row.summary.failures:
            reasons = ", ".join(f"{reason}: {count}" for reason, count in row.summary.failures.items())
            notes.append(
                f"stream probe → {row.target}: {row.summary.failed} of {row.summary.streams} failed ({reasons})"
            )
    lines += [f"- ⚠ {note}" for note in notes] or ["- no socket errors, non-2xx responses or error bodies"]
    for name, findings in report.log_findings.items():
        for message, count in list(findings.items())[:5]:
            lines.append(f"- ⚠ {name} log, {count:,}x: `{message[:300]}`")
    if report.logs_kept:
        lines.append(f"- logs kept in `{report.logs_kept}/`")
    return lines


def _redis_line(calls: dict[str, int], responses: int) -> str:
    scripts = sum(count for name, count in calls.items() if name in SCRIPT_COMMANDS)
    total = sum(calls.values())
    top = ", ".join(f"{name} {count:,}" for name, count in list(calls.items())[:6]) or "none"
    per = max(1, responses)
    return (
        f"- Redis during the load: {scripts:,} script calls ({scripts / per:.2f} per gateway request), "
        f"{total:,} commands counting those run inside scripts ({total / per:.2f} per request); top: {top}"
    )


def report_json(report: Report) -> dict[str, Any]:
    return {
        "started_at": report.started_at,
        "machine": report.machine,
        "settings": report.settings,
        "load": [
            {
                "scenario": cell.scenario.name,
                "unit": cell.scenario.unit,
                "target": cell.target,
                **cell_figures(report.cells, cell),
                "rounds": [run.to_json() for run in cell.runs],
                "other_cpu_per_round": cell.foreign_cpu,
            }
            for cell in report.cells
        ],
        "stream_probe": [{"target": row.target, **row.summary.to_json()} for row in report.probes],
        "paced_stream_probe": [{"target": row.target, **row.summary.to_json()} for row in report.paced_probes],
        "memory_mib": [row.__dict__ for row in report.memory],
        "ledger": report.ledger,
        "log_findings": report.log_findings,
        "logs_kept": report.logs_kept,
    }
