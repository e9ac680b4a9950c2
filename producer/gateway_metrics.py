"""Prometheus metrics of one gateway, on a registry of its own, served at its `/metrics`.

The workers' metrics say how the engine does (queue wait, TTFT, tokens); these say what HTTP
clients got: requests by route and status (429s, 5xx), how long they took, how many are in
flight, and how many were abandoned and cancelled in the fleet.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["GatewayMetrics"]

_DURATION_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class GatewayMetrics:
    """Counters and histograms, labelled by route template (never by raw path: bounded)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("tokenfleet_gateway_requests", "HTTP requests by route and "
                                "status (499: the client went away)", ["route", "status"],
                                registry=r)
        self.duration_s = Histogram("tokenfleet_gateway_request_duration_seconds",
                                    "Time from request to the end of the response (streams: "
                                    "to the last event)", ["route"],
                                    buckets=_DURATION_BUCKETS_S, registry=r)
        self.in_flight = Gauge("tokenfleet_gateway_requests_in_flight",
                               "Requests being answered", registry=r)
        self.abandoned = Counter("tokenfleet_gateway_abandoned",
                                 "Jobs cancelled in the fleet because their HTTP client went "
                                 "away, timed out, or the gateway stopped (an n > 1 request "
                                 "counts each of its jobs)", registry=r)

    def observe(self, route: str, status: int, duration_s: float) -> None:
        self.requests.labels(route=route, status=str(status)).inc()
        self.duration_s.labels(route=route).observe(duration_s)

    def exposition(self) -> bytes:
        """The text format Prometheus scrapes."""
        return generate_latest(self.registry)
