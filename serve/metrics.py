"""`GET /metrics` in Prometheus text format (prometheus-client), one registry per app.

HTTP-side metrics (requests by route, status and model; end-to-end latency; rate-limit
rejections) are recorded by the app; engine-side ones (tokens, time to first token,
inter-token latency, queue, slots, KV cache use, prefix-cache hits) are read from each model's
`SchedulerMetrics` at scrape time, so the engine thread never touches Prometheus objects.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from serve.state import ServerState

E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class ServerMetrics:
    def __init__(self, state: ServerState, limiter_rejections: dict[str, int]):
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "llama_jax_http_requests",
            "HTTP requests by route, status and model",
            ["route", "status", "model"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "llama_jax_http_request_duration_seconds",
            "End-to-end request latency (streams: to the last event)",
            ["route", "model"],
            buckets=E2E_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_EngineCollector(state, limiter_rejections))

    def observe(self, route: str, status: int, model: str, seconds: float) -> None:
        self.requests.labels(route, str(status), model).inc()
        self.latency.labels(route, model).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _EngineCollector:
    def __init__(self, state: ServerState, rejections: dict[str, int]):
        self.state = state
        self.rejections = rejections

    def collect(self):
        rej = CounterMetricFamily(
            "llama_jax_rate_limit_rejections", "Requests refused by rate limits", labels=["kind"]
        )
        for kind, n in self.rejections.items():
            rej.add_metric([kind], n)
        yield rej
        counters = {
            "prompt_tokens": ("llama_jax_prompt_tokens", "Prompt tokens received"),
            "cached_prompt_tokens": (
                "llama_jax_cached_prompt_tokens",
                "Prompt tokens reused from the prefix cache",
            ),
            "generated_tokens": ("llama_jax_generated_tokens", "Tokens generated"),
            "prefix_cache_hits": ("llama_jax_prefix_cache_hits", "Requests that reused a cached prefix"),
            "constrained_tokens": ("llama_jax_constrained_tokens", "Tokens sampled under a grammar"),
            "grammar_mask_seconds": (
                "llama_jax_grammar_mask_seconds",
                "Host time computing allowed-token masks for constrained decoding",
            ),
            "requests_submitted": ("llama_jax_engine_requests", "Requests submitted to the engine"),
        }
        families = {k: CounterMetricFamily(n, h, labels=["model"]) for k, (n, h) in counters.items()}
        finished = CounterMetricFamily(
            "llama_jax_engine_requests_finished", "Requests finished, by reason", labels=["model", "reason"]
        )
        gauges = {
            "queue_length": GaugeMetricFamily(
                "llama_jax_queue_length", "Requests waiting for a slot", labels=["model"]
            ),
            "live_slots": GaugeMetricFamily(
                "llama_jax_live_slots", "Slots holding a running request", labels=["model"]
            ),
            "max_slots": GaugeMetricFamily("llama_jax_max_slots", "Slots of the model", labels=["model"]),
            "kv_cache_usage": GaugeMetricFamily(
                "llama_jax_kv_cache_usage_ratio",
                "Share of the KV cache holding live sequences",
                labels=["model"],
            ),
        }
        up = GaugeMetricFamily(
            "llama_jax_model_ready", "1 when the model is loaded and its engine runs", labels=["model"]
        )
        hists = {
            "ttft": HistogramMetricFamily(
                "llama_jax_time_to_first_token_seconds",
                "Time from submission to the first token",
                labels=["model"],
            ),
            "itl": HistogramMetricFamily(
                "llama_jax_inter_token_latency_seconds",
                "Time between consecutive tokens of a request",
                labels=["model"],
            ),
        }
        for entry in self.state.models:
            up.add_metric([entry.id], 1.0 if entry.healthy else 0.0)
            gen = entry.generator
            if gen is None:
                continue
            snap = gen.scheduler.metrics.snapshot()
            for k, fam in families.items():
                fam.add_metric([entry.id], snap[k])
            for reason, n in snap["requests_finished"].items():
                finished.add_metric([entry.id, reason], n)
            g = gen.scheduler.gauges()
            g["queue_length"] += gen.loop.backlog
            for k, fam in gauges.items():
                fam.add_metric([entry.id], g[k])
            for k, fam in hists.items():
                h = snap[k]
                cumulative, buckets = 0, []
                for bound, count in zip((*h["bounds"], float("inf")), h["counts"], strict=True):
                    cumulative += count
                    buckets.append(("+Inf" if bound == float("inf") else repr(float(bound)), cumulative))
                fam.add_metric([entry.id], buckets, h["sum"])
        yield from families.values()
        yield finished
        yield from gauges.values()
        yield up
        yield from hists.values()
