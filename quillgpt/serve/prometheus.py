"""The server's figures in Prometheus' text exposition format (`GET /metrics`).

A handful of counters, gauges and two histograms need no client library: each is written as
`# HELP`, `# TYPE` and its sample lines (a histogram: cumulative `_bucket{le="..."}` lines, then
`_sum` and `_count`), as https://prometheus.io/docs/instrumenting/exposition_formats/ describes.
The worker thread observes; the event loop renders; a lock keeps a histogram's lines consistent.
"""

from __future__ import annotations

import bisect
import threading

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# seconds: from a millisecond (a token of a small model) to a minute (a long queue)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Histogram:
    """Observations counted into cumulative buckets (upper bounds `buckets`, then +Inf)."""

    def __init__(self, name: str, help: str, buckets: tuple[float, ...] = LATENCY_BUCKETS):
        self.name, self.help, self.buckets = name, help, tuple(sorted(buckets))
        self.counts = [0] * (len(self.buckets) + 1)  # the last: above every bound
        self.sum = 0.0
        self.lock = threading.Lock()

    def observe(self, value: float) -> None:
        with self.lock:
            self.counts[bisect.bisect_left(self.buckets, value)] += 1
            self.sum += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def lines(self) -> list[str]:
        with self.lock:
            counts, total = list(self.counts), self.sum
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        running = 0
        for bound, n in zip([*map(_number, self.buckets), "+Inf"], counts):
            running += n
            out.append(f'{self.name}_bucket{{le="{bound}"}} {running}')
        out += [f"{self.name}_sum {_number(total)}", f"{self.name}_count {running}"]
        return out


def _number(x: float) -> str:
    return repr(float(x)) if isinstance(x, float) else str(x)


def sample(kind: str, name: str, help: str, value: float) -> list[str]:
    """One counter or gauge: its HELP, TYPE and value lines."""
    return [f"# HELP {name} {help}", f"# TYPE {name} {kind}", f"{name} {_number(value)}"]


def render(families: list[list[str]]) -> str:
    return "\n".join(line for family in families for line in family) + "\n"
