"""Prometheus metrics of one worker, on a registry of its own (no global state)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from tokenfleet.producer.protocol import FinalEvent

__all__ = ["WorkerMetrics"]

_LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_TPOT_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class WorkerMetrics:
    """Queue wait, TTFT, TPOT, tokens, batch size, KV usage, errors, dead letters, reclaims."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.queue_wait_s = Histogram("tokenfleet_queue_wait_seconds",
                                      "Time from submit to intake", buckets=_LATENCY_BUCKETS_S,
                                      registry=r)
        self.ttft_s = Histogram("tokenfleet_time_to_first_token_seconds",
                                "Time from submit to the first token", buckets=_LATENCY_BUCKETS_S,
                                registry=r)
        self.tpot_s = Histogram("tokenfleet_time_per_output_token_seconds",
                                "Mean time between tokens after the first, per request",
                                buckets=_TPOT_BUCKETS_S, registry=r)
        self.e2e_s = Histogram("tokenfleet_request_duration_seconds",
                               "Time from submit to the final event", buckets=_LATENCY_BUCKETS_S,
                               registry=r)
        self.generated_tokens = Counter("tokenfleet_generated_tokens",
                                        "Tokens generated", registry=r)
        self.prompt_tokens = Counter("tokenfleet_prompt_tokens", "Prompt tokens processed",
                                     registry=r)
        self.requests = Counter("tokenfleet_requests", "Finished requests by outcome",
                                ["outcome"], registry=r)
        self.errors = Counter("tokenfleet_errors", "Requests failed, by error_type",
                              ["error_type"], registry=r)
        self.dead_letters = Counter("tokenfleet_dead_letters", "Entries moved to the "
                                    "dead-letter stream", registry=r)
        self.reclaims = Counter("tokenfleet_reclaims", "Jobs reclaimed from silent workers",
                                registry=r)
        self.batch_size = Histogram("tokenfleet_batch_size", "Sequences per engine step",
                                    buckets=_BATCH_BUCKETS, registry=r)
        self.step_s = Histogram("tokenfleet_engine_step_seconds", "Engine step duration",
                                buckets=_TPOT_BUCKETS_S, registry=r)
        self.running = Gauge("tokenfleet_running_requests", "Sequences running", registry=r)
        self.waiting = Gauge("tokenfleet_waiting_requests", "Sequences waiting in the engine",
                             registry=r)
        self.kv_usage = Gauge("tokenfleet_kv_cache_usage_ratio", "Fraction of KV blocks in use",
                              registry=r)
        # Speculative decoding (vLLM's spec_decode counters): acceptance = accepted / drafted.
        self.draft_tokens = Counter("tokenfleet_spec_draft_tokens", "Draft tokens verified "
                                    "(speculative decoding)", registry=r)
        self.accepted_draft_tokens = Counter("tokenfleet_spec_accepted_tokens",
                                             "Draft tokens accepted", registry=r)
        self._server: Any = None

    def observe_final(self, final: FinalEvent) -> None:
        """Count one request that ended with a final event."""
        self.requests.labels(outcome=final.details.finish_reason).inc()
        self.prompt_tokens.inc(final.usage.prompt_tokens)
        self.e2e_s.observe(final.total_ms / 1000)
        if final.ttft_ms is not None:
            self.ttft_s.observe(final.ttft_ms / 1000)
            n = final.details.generated_tokens
            if n > 1:
                self.tpot_s.observe((final.total_ms - final.ttft_ms) / 1000 / (n - 1))

    def serve(self, port: int, host: str = "0.0.0.0") -> None:
        """Serve /metrics on `port` in a daemon thread (0 = off)."""
        if port:
            self._server, _thread = start_http_server(port, addr=host, registry=self.registry)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
