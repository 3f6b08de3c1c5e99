"""``GET /metrics``: the server's Prometheus metrics (one registry per app: apps never mix)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from ..batching import Finished

LATENCY = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)


class Metrics:
    """Requests, tokens, batch sizes (decode steps and prefills), queue depth, latency and routing time."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "lag_requests", "HTTP requests answered", ["endpoint", "mode", "status"], registry=r
        )
        self.prompt_tokens = Counter("lag_prompt_tokens", "prompt tokens of finished generations", registry=r)
        self.generated_tokens = Counter("lag_generated_tokens", "tokens generated", registry=r)
        self.finished = Counter(
            "lag_generations", "generations finished, by finish reason", ["reason"], registry=r
        )
        self.batch_size = Histogram(
            "lag_batch_size",
            "rows decoded together per step",
            buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64),
            registry=r,
        )
        self.prefill_size = Histogram(
            "lag_prefill_batch_size",
            "prompts prefilled together in one forward",
            buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64),
            registry=r,
        )
        self.queue_depth = Gauge("lag_queue_depth", "requests waiting for a batch slot", registry=r)
        self.running = Gauge("lag_running_rows", "rows in the running batch", registry=r)
        self.latency = Histogram(
            "lag_request_latency_seconds",
            "request latency (to the last byte)",
            ["endpoint"],
            buckets=LATENCY,
            registry=r,
        )
        self.first_token = Histogram(
            "lag_time_to_first_token_seconds", "submission to first token", buckets=LATENCY, registry=r
        )
        self.routing = Counter("lag_routing_seconds", "time spent in adapter routing", registry=r)

    def on_step(self, batch_size: int, queued: int) -> None:
        self.batch_size.observe(batch_size)
        self.running.set(batch_size)
        self.queue_depth.set(queued)

    def on_prefill(self, prompts: int) -> None:
        self.prefill_size.observe(prompts)

    def on_finish(self, done: Finished) -> None:
        self.finished.labels(done.finish_reason).inc()
        self.prompt_tokens.inc(done.prompt_tokens)
        self.generated_tokens.inc(len(done.tokens))
        self.routing.inc(done.routing_seconds)
        if done.first_token_seconds is not None:
            self.first_token.observe(done.first_token_seconds)

    def render(self, engine: Any = None) -> bytes:
        if engine is not None:
            self.queue_depth.set(engine.queued)
            self.running.set(engine.running)
        return generate_latest(self.registry)
