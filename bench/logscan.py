"""Warnings and errors in the services' logs, boiled down to distinct messages with counts."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

_PLAIN_MARKERS = ("[warn]", "[error]", "[crit]", "[alert]", "[emerg]")  # nginx error.log


def _json_problem(line: str) -> str | None:
    try:
        entry = json.loads(line)
    except ValueError:
        return None
    if not isinstance(entry, dict) or entry.get("level") not in ("warning", "error", "critical"):
        return None
    summary = f"{entry['level']}: {entry.get('msg', '')}"
    exc = str(entry.get("exc") or "").strip().splitlines()
    return f"{summary} ({exc[-1]})" if exc else summary


def problems(text: str) -> Counter[str]:
    """JSON log lines at warning or above; Python tracebacks (by their last line); nginx error.log entries."""
    found: Counter[str] = Counter()
    in_traceback = False
    for line in text.splitlines():
        if line.startswith("{"):
            problem = _json_problem(line)
            if problem:
                found[problem] += 1
        elif line.startswith("Traceback (most recent call last)"):
            in_traceback = True
        elif in_traceback and line and not line[0].isspace():
            found[f"traceback: {line.strip()}"] += 1
            in_traceback = False
        elif any(marker in line for marker in _PLAIN_MARKERS):
            found[line.split("] ", 1)[-1][:200]] += 1
    return found


def scan(logs: dict[str, Path]) -> dict[str, dict[str, int]]:
    """Per log name: distinct problem -> count (empty when the log is clean)."""
    result: dict[str, dict[str, int]] = {}
    for name, path in logs.items():
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        result[name] = dict(problems(text).most_common())
    return result
