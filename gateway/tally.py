"""Hot-path metrics, tallied in plain dicts and handed to prometheus-client in batches.

A prometheus-client update costs microseconds (a label lookup, a lock, and with several workers a write into a
memory-mapped file); a request touches a dozen series. Here a request only adds to dict entries; `flush` (every
second, and before every scrape) moves the totals into the real metrics, so what Prometheus reads is at most a
second old and exactly the same in sum.
"""

from __future__ import annotations

import asyncio
import bisect
from collections import defaultdict
from typing import Any

from prometheus_client import Counter, Gauge, Histogram


class _HistogramTally:
    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last is +Inf
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value


class Tally:
    def __init__(self) -> None:
        self._counters: dict[tuple[Counter, tuple[str, ...]], float] = defaultdict(float)
        self._histograms: dict[tuple[Histogram, tuple[str, ...]], _HistogramTally] = {}
        self._levels: dict[tuple[Gauge, tuple[str, ...]], int] = defaultdict(int)
        self._changed_levels: set[tuple[Gauge, tuple[str, ...]]] = set()

    def count(self, metric: Counter, labels: tuple[str, ...], amount: float = 1.0) -> None:
        self._counters[(metric, labels)] += amount

    def observe(self, metric: Histogram, labels: tuple[str, ...], value: float) -> None:
        key = (metric, labels)
        tally = self._histograms.get(key)
        if tally is None:
            tally = self._histograms[key] = _HistogramTally(tuple(metric._upper_bounds[:-1]))
        tally.observe(value)

    def level(self, metric: Gauge, labels: tuple[str, ...], delta: int) -> None:
        """A gauge of things in progress (requests in flight): its value is set at the next flush."""
        self._levels[(metric, labels)] += delta
        self._changed_levels.add((metric, labels))

    def flush(self) -> None:
        counters, self._counters = self._counters, defaultdict(float)
        for (metric, labels), amount in counters.items():
            _child(metric, labels).inc(amount)
        histograms, self._histograms = self._histograms, {}
        for (histogram, histogram_labels), tally in histograms.items():
            child = _child(histogram, histogram_labels)
            # prometheus-client keeps one (non-cumulative) value per bucket and the sum; add to them directly.
            for index, count in enumerate(tally.counts):
                if count:
                    child._buckets[index].inc(count)
            child._sum.inc(tally.total)
        changed, self._changed_levels = self._changed_levels, set()
        for key in changed:
            _child(key[0], key[1]).set(self._levels[key])

    async def flush_forever(self, interval: float = 1.0) -> None:
        while True:
            await asyncio.sleep(interval)
            self.flush()


def _child(metric: Any, labels: tuple[str, ...]) -> Any:
    return metric.labels(*labels) if labels else metric


TALLY = Tally()
