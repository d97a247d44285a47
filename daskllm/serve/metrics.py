"""Prometheus metrics of the server: counted as requests pass, read from the engine at scrape time.

Counters and histograms are updated by the handlers; queue lengths and the ranks' figures
(step time, live sequences, KV-cache bytes) are read from the engine when /metrics is
scraped, so nothing polls the ranks in between. Each server has its own registry.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, SummaryMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    def __init__(self, engine):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("daskllm_requests", "HTTP requests answered, by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("daskllm_prompt_tokens", "Prompt tokens of the requests served", registry=r)
        self.generation_tokens = Counter("daskllm_generation_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram("daskllm_time_to_first_token_seconds",
                              "From a request's arrival to its first generated token", buckets=_SECONDS, registry=r)
        self.latency = Histogram("daskllm_request_latency_seconds",
                                 "From a request's arrival to its last token", ["endpoint"], buckets=_SECONDS,
                                 registry=r)
        r.register(_EngineCollector(engine))

    def exposition(self) -> bytes:
        """The Prometheus text format (blocking: it asks every rank for its stats)."""
        return generate_latest(self.registry)


class _EngineCollector:
    """Queue lengths and per-rank figures, read from the engine at each scrape."""

    def __init__(self, engine):
        self.engine = engine

    def collect(self):
        waiting, running = self.engine.queue_lengths()
        yield GaugeMetricFamily("daskllm_requests_waiting", "Requests queued for a KV-cache slot", value=waiting)
        yield GaugeMetricFamily("daskllm_requests_running", "Requests in the running batch", value=running)
        step = SummaryMetricFamily("daskllm_rank_step_seconds", "Time each rank spent in forward steps",
                                   labels=["rank"])
        live = GaugeMetricFamily("daskllm_rank_live_sequences", "Sequences holding a KV cache on each rank",
                                 labels=["rank"])
        cache = GaugeMetricFamily("daskllm_rank_kv_cache_bytes", "KV-cache bytes reserved on each rank",
                                  labels=["rank"])
        try:
            ranks = self.engine.rank_stats()
        except Exception:   # noqa: BLE001 - a replica lost mid-scrape: report what is known
            ranks = []
        for rank, stats in ranks:
            label = [str(rank)]
            step.add_metric(label, count_value=stats.get("steps", 0), sum_value=stats.get("compute_seconds", 0.0))
            live.add_metric(label, stats["memory"].get("live_sequences", 0))
            cache.add_metric(label, stats["memory"].get("cache_bytes", 0))
        yield from (step, live, cache)
