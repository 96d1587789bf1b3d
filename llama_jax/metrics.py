"""Scheduler metrics: counters, gauges and latency histograms, for the server to export.

Plain Python, updated by the engine thread only; readers on other threads take `snapshot()`
(a dict of numbers), which may be one step stale but is never torn in a harmful way.
"""

from __future__ import annotations

import bisect
import dataclasses

# Latency bucket upper bounds in seconds (Prometheus-style, +Inf implied).
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
ITL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5)


@dataclasses.dataclass
class Histogram:
    bounds: tuple[float, ...]
    counts: list[int] = dataclasses.field(default_factory=list)  # per bucket, +Inf last
    total: float = 0.0
    n: int = 0

    def __post_init__(self):
        self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value
        self.n += 1


@dataclasses.dataclass
class SchedulerMetrics:
    requests_submitted: int = 0
    requests_finished: dict[str, int] = dataclasses.field(default_factory=dict)  # by finish reason
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0
    generated_tokens: int = 0
    prefix_cache_hits: int = 0
    constrained_tokens: int = 0  # tokens sampled under a grammar
    grammar_mask_seconds: float = 0.0  # host time spent computing their allowed-token masks
    ttft: Histogram = dataclasses.field(default_factory=lambda: Histogram(TTFT_BUCKETS))
    itl: Histogram = dataclasses.field(default_factory=lambda: Histogram(ITL_BUCKETS))

    def snapshot(self) -> dict:
        return {
            "requests_submitted": self.requests_submitted,
            "requests_finished": dict(self.requests_finished),
            "prompt_tokens": self.prompt_tokens,
            "cached_prompt_tokens": self.cached_prompt_tokens,
            "generated_tokens": self.generated_tokens,
            "prefix_cache_hits": self.prefix_cache_hits,
            "constrained_tokens": self.constrained_tokens,
            "grammar_mask_seconds": self.grammar_mask_seconds,
            "ttft": {
                "bounds": self.ttft.bounds,
                "counts": list(self.ttft.counts),
                "sum": self.ttft.total,
                "count": self.ttft.n,
            },
            "itl": {
                "bounds": self.itl.bounds,
                "counts": list(self.itl.counts),
                "sum": self.itl.total,
                "count": self.itl.n,
            },
        }
