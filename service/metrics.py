"""Prometheus instruments: histograms rather than summaries, so replicas aggregate."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    """One registry per app, so two apps in one process (tests) never share counters."""

    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter("digitgen_requests", "HTTP requests by endpoint and status",
                                ["endpoint", "status"], registry=self.registry)
        self.latency = Histogram("digitgen_request_seconds", "HTTP request latency by endpoint",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.inference = Histogram("digitgen_inference_seconds", "ONNX Runtime time per call, by model",
                                   ["model"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.batch = Histogram("digitgen_inference_batch_size", "images per ONNX Runtime call, by model",
                               ["model"], buckets=BATCH_BUCKETS, registry=self.registry)
