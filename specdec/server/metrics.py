"""Prometheus metrics of one server (its own registry, so several servers can share a process).

Counters are fed by the engine loop as requests finish and tokens are emitted; gauges
(queue lengths, KV-cache usage, acceptance) are refreshed after every engine step.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

FINISH_REASONS = ("stop", "length", "abort", "error")
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ServerMetrics:
    """The server's metric families, all prefixed ``specdec_``.

    Engine requests are counted per choice (a request with n=2 and two prompts is four).
    """

    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("specdec_requests", "Finished engine requests (one per choice) by finish reason",
                                ["status"], registry=r)
        self.http_responses = Counter("specdec_http_responses", "HTTP responses by endpoint and status code",
                                      ["endpoint", "code"], registry=r)
        self.prompt_tokens = Counter("specdec_prompt_tokens", "Prompt tokens admitted", registry=r)
        self.generation_tokens = Counter("specdec_generation_tokens", "Tokens generated", registry=r)
        self.steps = Counter("specdec_engine_steps", "Engine steps that ran at least one request", registry=r)
        self.step_seconds = Histogram("specdec_step_duration_seconds", "Wall time of one engine step",
                                      buckets=_LATENCY_BUCKETS, registry=r)
        self.step_batch = Histogram("specdec_step_batch_size", "Requests in one engine step",
                                    buckets=_BATCH_BUCKETS, registry=r)
        self.ttft = Histogram("specdec_time_to_first_token_seconds",
                              "From admission to the first generated token, per choice",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.running = Gauge("specdec_num_requests_running", "Requests in the running batch", registry=r)
        self.waiting = Gauge("specdec_num_requests_waiting", "Requests queued for the batch", registry=r)
        self.kv_usage = Gauge("specdec_kv_cache_usage_ratio", "Fraction of KV-cache blocks in use", registry=r)
        self.acceptance = Gauge("specdec_acceptance_rate_by_position",
                                "Accepted / proposed draft tokens at each draft position (finished requests)",
                                ["position"], registry=r)
        self.acceptance_rate = Gauge("specdec_acceptance_rate", "Accepted / proposed draft tokens (finished requests)",
                                     registry=r)
        self.mean_accepted_length = Gauge("specdec_mean_accepted_length",
                                          "Tokens emitted per target forward (finished requests)", registry=r)
        self.per_draft_step = Gauge("specdec_accepted_length_per_draft_step",
                                    "1 + accepted drafts per step that verified drafts (finished requests)",
                                    registry=r)
        for reason in FINISH_REASONS:  # present from the start, at 0
            self.requests.labels(reason)

    def refresh(self, llm) -> None:
        """Gauges from the engine's state; call from the thread that steps ``llm``."""
        load = llm.load()
        self.running.set(load.running)
        self.waiting.set(load.waiting)
        self.kv_usage.set(load.kv_cache_usage)
        m = llm.metrics()
        self.acceptance_rate.set(m["acceptance_rate"])
        self.mean_accepted_length.set(m["mean_accepted_length"])
        self.per_draft_step.set(m["accepted_length_per_draft_step"])
        for i, rate in enumerate(m["acceptance_rate_by_position"]):
            self.acceptance.labels(str(i)).set(rate)

    def render(self) -> bytes:
        return generate_latest(self.registry)
