"""Prometheus metrics of one server (prometheus_client, with a registry per app so that two apps
in one process, e.g. in tests, count separately). Exposed as text at GET /metrics.

    lmengine_requests_total{endpoint,status}     finished HTTP requests of the API
    lmengine_prompt_tokens_total                 prompt tokens of accepted requests
    lmengine_generation_tokens_total             generated tokens (all n samples)
    lmengine_requests_in_progress                requests being answered now
    lmengine_queue_depth                         requests waiting for a cache slot
    lmengine_batch_size                          sequences in the scheduler's running batch
    lmengine_scheduler_steps_total               scheduler steps
    lmengine_scheduler_decode_rows_total         decode rows over all steps (/ steps = mean batch)
    lmengine_scheduler_prefill_tokens_total      prompt tokens computed by the model (not cached)
    lmengine_scheduler_preemptions_total         running requests pre-empted by a more urgent one
    lmengine_time_to_first_token_seconds         histogram, from arrival to the first token
    lmengine_inter_token_latency_seconds         histogram, between consecutive tokens of a stream
    lmengine_request_duration_seconds            histogram, from arrival to the last token
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)
_REQUEST_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)


class _SchedulerStats:
    """Reads the scheduler's step counters at scrape time."""

    def __init__(self, scheduler):
        self.scheduler = scheduler

    def collect(self):
        stats = dict(self.scheduler.stats)
        for key, doc in (("steps", "scheduler steps"),
                         ("decode_rows", "decode rows over all steps (divide by steps for the mean batch)"),
                         ("prefill_tokens", "prompt tokens computed by the model"),
                         ("preemptions", "running requests pre-empted by a more urgent one (priority)")):
            family = CounterMetricFamily(f"lmengine_scheduler_{key}", doc)
            family.add_metric([], stats.get(key, 0))
            yield family


class Metrics:
    """The counters, gauges and histograms of one app."""

    def __init__(self, scheduler):
        self.registry = registry = CollectorRegistry()
        self.requests = Counter("lmengine_requests", "finished API requests", ["endpoint", "status"],
                                registry=registry)
        self.prompt_tokens = Counter("lmengine_prompt_tokens", "prompt tokens of accepted requests",
                                     registry=registry)
        self.generation_tokens = Counter("lmengine_generation_tokens", "generated tokens", registry=registry)
        self.in_progress = Gauge("lmengine_requests_in_progress", "requests being answered", registry=registry)
        queue = Gauge("lmengine_queue_depth", "requests waiting for a cache slot", registry=registry)
        queue.set_function(scheduler.queue_depth)
        batch = Gauge("lmengine_batch_size", "sequences in the running batch", registry=registry)
        batch.set_function(lambda: len(scheduler.running))
        self.ttft = Histogram("lmengine_time_to_first_token_seconds", "arrival to first token",
                              buckets=_LATENCY_BUCKETS, registry=registry)
        self.itl = Histogram("lmengine_inter_token_latency_seconds", "between consecutive tokens",
                             buckets=_LATENCY_BUCKETS, registry=registry)
        self.duration = Histogram("lmengine_request_duration_seconds", "arrival to last token",
                                  buckets=_REQUEST_BUCKETS, registry=registry)
        registry.register(_SchedulerStats(scheduler))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestTimer:
    """Time to first token, inter-token latencies and duration of one request."""

    def __init__(self, metrics: Metrics, t_arrival: float):
        self.metrics = metrics
        self.t_arrival = t_arrival
        self.t_last: dict[int, float] = {}        # per sample index: when its last token came

    def tokens(self, index: int, n_tokens: int, now: float) -> None:
        if n_tokens <= 0:
            return
        if not self.t_last:
            self.metrics.ttft.observe(now - self.t_arrival)
        last = self.t_last.get(index)
        if last is not None:
            gap = (now - last) / n_tokens       # tokens that arrived together share the gap
            for _ in range(n_tokens):
                self.metrics.itl.observe(gap)
        self.t_last[index] = now
        self.metrics.generation_tokens.inc(n_tokens)

    def done(self, now: float) -> None:
        self.metrics.duration.observe(now - self.t_arrival)
