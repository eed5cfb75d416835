"""Prometheus metrics of one gateway (a registry per app, so tests can build several apps)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("hybridcn_requests_total", "Classification requests by outcome",
                                ["outcome"], registry=self.registry)
        self.fields = Counter("hybridcn_fields_total", "Classified fields by predicted class",
                              ["label"], registry=self.registry)
        self.reviews = Counter("hybridcn_review_total", "Fields flagged for review", registry=self.registry)
        self.stage_seconds = Histogram(
            "hybridcn_stage_seconds", "Time per pipeline stage", ["stage"], registry=self.registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )
        self.triton_ready = Gauge("hybridcn_triton_ready", "1 when the Triton ensemble is ready",
                                  registry=self.registry)
