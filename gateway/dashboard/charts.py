"""Charts as inline SVG, drawn on the server: no JavaScript, no CDN, and they print. Each bar has a `<title>` (the
browser's tooltip) with its exact value."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from html import escape

PALETTE = ("#4f46e5", "#0ea5e9", "#10b981", "#f59e0b", "#ef4444", "#8b5cf6", "#14b8a6", "#f97316", "#64748b")


@dataclass(frozen=True, slots=True)
class Series:
    name: str
    values: Sequence[float]  # one per x label


def _nice_max(value: float) -> float:
    if value <= 0:
        return 1.0
    magnitude = 10 ** len(str(int(value))) / 10 if value >= 1 else 1.0
    while magnitude > value and magnitude > 1e-9:
        magnitude /= 10
    for step in (1, 2, 2.5, 5, 10):
        if step * magnitude >= value:
            return step * magnitude
    return 10 * magnitude


def stacked_bars(
    labels: Sequence[str],
    series: Sequence[Series],
    *,
    title: str,
    fmt: Callable[[float], str],
    chart_id: str,
    width: int = 760,
    height: int = 260,
) -> str:
    """A stacked bar chart: one bar per label (e.g. a day), one colour per series (e.g. a team)."""
    left, right, top, bottom = 70, 12, 12, 40
    plot_w, plot_h = width - left - right, height - top - bottom
    totals = [sum(item.values[index] for item in series) for index in range(len(labels))]
    ymax = _nice_max(max(totals, default=0))
    parts = [
        f'<svg class="chart" id="{escape(chart_id)}" viewBox="0 0 {width} {height}" role="img" '
        f'aria-label="{escape(title)}" preserveAspectRatio="xMidYMid meet">'
    ]
    for tick in range(5):
        value = ymax * tick / 4
        y = top + plot_h - plot_h * tick / 4
        parts.append(f'<line class="grid" x1="{left}" x2="{width - right}" y1="{y:.1f}" y2="{y:.1f}"/>')
        parts.append(f'<text class="axis" x="{left - 8}" y="{y + 4:.1f}" text-anchor="end">{escape(fmt(value))}</text>')
    slot = plot_w / max(len(labels), 1)
    bar_w = max(min(slot * 0.7, 48), 2)
    every = max(1, len(labels) // 10)
    for index, label in enumerate(labels):
        x = left + slot * index + (slot - bar_w) / 2
        y = top + plot_h
        for colour, item in zip(_colours(len(series)), series, strict=True):
            value = item.values[index]
            if value <= 0:
                continue
            h = plot_h * value / ymax
            y -= h
            parts.append(
                f'<rect class="bar" x="{x:.1f}" y="{y:.1f}" width="{bar_w:.1f}" height="{h:.1f}" fill="{colour}" '
                f'data-series="{escape(item.name)}" data-label="{escape(label)}" data-value="{value}">'
                f"<title>{escape(item.name)} · {escape(label)}: {escape(fmt(value))}</title></rect>"
            )
        if index % every == 0:
            parts.append(
                f'<text class="axis" x="{left + slot * index + slot / 2:.1f}" y="{height - bottom + 16}" '
                f'text-anchor="middle">{escape(label[5:] if len(label) == 10 else label)}</text>'
            )
    parts.append("</svg>")
    legend = "".join(
        f'<span class="legend-item"><svg viewBox="0 0 10 10" class="swatch"><rect width="10" height="10" rx="3" '
        f'fill="{colour}"/></svg>{escape(item.name)}</span>'
        for colour, item in zip(_colours(len(series)), series, strict=True)
    )
    return (
        f'<figure class="chart-box"><figcaption>{escape(title)}</figcaption>{"".join(parts)}'
        f'<div class="legend">{legend}</div></figure>'
    )


def _colours(count: int) -> list[str]:
    return [PALETTE[index % len(PALETTE)] for index in range(count)]


def meter(used: float, limit: float, *, label: str, detail: str) -> str:
    """A horizontal bar of use against a limit, coloured by how close it is."""
    percent = 100.0 * used / limit if limit else 100.0
    level = "ok" if percent < 80 else ("warn" if percent < 100 else "over")
    return (
        f'<div class="meter {level}" data-percent="{percent:.2f}"><div class="meter-head"><span>{escape(label)}</span>'
        f"<span>{escape(detail)} · {percent:.1f}%</span></div>"
        # SVG attributes, not inline styles: the dashboard's CSP allows no inline style.
        f'<svg class="meter-track" viewBox="0 0 100 10" preserveAspectRatio="none">'
        f'<rect class="meter-bg" width="100" height="10" rx="5"/>'
        f'<rect class="meter-fill" width="{min(percent, 100):.2f}" height="10" rx="5"/>'
        f'<line class="meter-mark" x1="80" x2="80" y1="0" y2="10"/></svg></div>'
    )
