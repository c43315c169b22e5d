"""Prometheus instruments: histograms rather than summaries, so replicas aggregate."""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess

from service import process_metrics

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
QUEUE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    """One registry per app, so two apps in one process (tests) never share counters. With several
    uvicorn workers (PROMETHEUS_MULTIPROC_DIR set by `python -m service`), values live in shared files and
    a scrape sums every worker's."""

    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter("digitgen_requests", "HTTP requests by endpoint and status",
                                ["endpoint", "status"], registry=self.registry)
        self.latency = Histogram("digitgen_request_seconds", "HTTP request latency by endpoint",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.inference = Histogram("digitgen_inference_seconds", "ONNX Runtime time per batched call, by model and version",
                                   ["model", "version"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.batch = Histogram("digitgen_inference_batch_size", "images per ONNX Runtime call, by model and version",
                               ["model", "version"], buckets=BATCH_BUCKETS, registry=self.registry)
        self.queue_wait = Histogram("digitgen_queue_wait_seconds", "time a request waited for its batch, by model "
                                    "and version (its count: requests each version served)",
                                    ["model", "version"], buckets=QUEUE_BUCKETS, registry=self.registry)
        self.reloads = Counter("digitgen_reloads", "model set reloads (SIGHUP) by result: ok or failed",
                               ["result"], registry=self.registry)
        self.key_requests = Counter("digitgen_key_requests", "requests by API key name (never the key)",
                                    ["key"], registry=self.registry)
        self.key_throttled = Counter("digitgen_key_throttled", "requests refused (429) for being over their key's "
                                     "rate limit, by key name", ["key"], registry=self.registry)
        # what a HorizontalPodAutoscaler reads (deploy/k8s/prometheus-adapter): requests a pod holds, the
        # probes and scrapes left out, so an idle pod reads 0
        self.in_flight = Gauge("digitgen_in_flight_requests", "requests being served, HTTP and gRPC (the probes "
                               "and /metrics aside), all workers", registry=self.registry, multiprocess_mode="livesum")
        self.queued = Gauge("digitgen_queued_requests", "requests waiting for a batch, by model and version",
                            ["model", "version"], registry=self.registry, multiprocess_mode="livesum")
        # Each worker scores its own share of what it served: the scrape shows the lowest live worker's
        # figure (a worker serving worse output shows, where a mean would hide it) and the samples behind all.
        self.live_confidence = Gauge("digitgen_live_confidence", "the judge's confidence (share of samples above "
                                     "its threshold) over the last samples a model served and the judge scored; "
                                     "lowest of the workers", ["model", "version"], registry=self.registry,
                                     multiprocess_mode="livemin")
        self.live_scored = Gauge("digitgen_live_scored_samples", "served samples behind digitgen_live_confidence, "
                                 "all workers", ["model", "version"], registry=self.registry, multiprocess_mode="livesum")

        self.gpu_memory = Gauge("digitgen_gpu_memory_bytes", "GPU memory the workers hold themselves "
                                "(nvidia-smi), updated every GPU_MEMORY_EVERY_S while a model runs on CUDA",
                                registry=self.registry, multiprocess_mode="livesum")
        self.gpu_process_memory = Gauge("digitgen_gpu_process_memory_bytes", "GPU memory the inference process "
                                        "holds for every worker (DIGITGEN_GPU_SESSIONS=shared); the service's "
                                        "total is this plus digitgen_gpu_memory_bytes",
                                        registry=self.registry, multiprocess_mode="livemax")
        self.device = Gauge("digitgen_model_device", "1 for the provider each model runs on; batches of at most "
                            "cpu_up_to images run on the CPU instead", ["model", "provider", "cpu_up_to"],
                            registry=self.registry, multiprocess_mode="livemax")
        self.model_state = Gauge("digitgen_model_state", "workers whose model runs in each state (local, inference "
                                 "process, local: connecting / reconnecting / quarantined) and why (cause)",
                                 ["model", "state", "cause"], registry=self.registry, multiprocess_mode="livesum")

        # one series per worker process (a `pid` label with several workers), kept while it lives
        self.process = {name: Gauge(f"digitgen_process_{name}", help, registry=self.registry, multiprocess_mode="liveall")
                        for name, help in (("cpu_seconds", "CPU time (user + system) this worker process used"),
                                           ("resident_memory_bytes", "resident memory of this worker process"),
                                           ("open_fds", "open file descriptors of this worker process "
                                                        "(connections included)"),
                                           ("threads", "threads of this worker process"))}

    def worker_exits(self) -> None:
        """Drop this worker's live gauge values from the shared files."""
        if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
            multiprocess.mark_process_dead(os.getpid())

    def exposition(self) -> bytes:
        """The text a Prometheus scrape gets (this worker's process figures read first)."""
        process_metrics.update(self)
        if "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
            return generate_latest(self.registry)
        every_worker = CollectorRegistry()
        multiprocess.MultiProcessCollector(every_worker)
        return generate_latest(every_worker)

    def placement_changed(self, model, old, new) -> None:
        """A model's placement as gauges (service/runtime/model.py reports each change; new None: closed)."""
        for placement, value in ((old, 0), (new, 1)):
            if placement is None:
                continue
            self.model_state.labels(model.name, placement.state.value, placement.cause).inc(1 if value else -1)
            self.device.labels(model.name, placement.provider, str(placement.cpu_up_to)).set(value)
