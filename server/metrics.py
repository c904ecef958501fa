"""Prometheus metrics of one server, in its own registry (several servers may live in one test process).

    mmkd_requests_total{model,api,code}            finished requests by gRPC status code name
    mmkd_request_seconds{model,api}                end-to-end server time per request
    mmkd_queue_seconds{model}                      time a request waited in the batcher
    mmkd_compute_seconds{model}                    ORT time per batch
    mmkd_batch_size{model}                         executed batch sizes (mean = _sum / _count)
    mmkd_inflight_requests{model}                  requests being handled now
    mmkd_queue_depth{model}                        requests waiting in the batcher now
    mmkd_dropped_total{model,reason}               queue_full | expired | cancelled (never computed)
    mmkd_model_info{model,version,variant,provider} 1 per served model: the provider really in use
    mmkd_model_ready{model}                        1 once warmed up, 0 while loading or draining
    mmkd_model_process_deaths_total{model}         model processes that died while serving (each restarts)
"""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)


class ServerMetrics:
    """All metric families of one server."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("mmkd_requests", "Finished requests by status code", ["model", "api", "code"],
                                registry=r)
        self.request_seconds = Histogram("mmkd_request_seconds", "Server time per request", ["model", "api"],
                                         buckets=_LATENCY_BUCKETS, registry=r)
        self.queue_seconds = Histogram("mmkd_queue_seconds", "Time queued in the batcher", ["model"],
                                       buckets=_LATENCY_BUCKETS, registry=r)
        self.compute_seconds = Histogram("mmkd_compute_seconds", "ONNX Runtime time per batch", ["model"],
                                         buckets=_LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("mmkd_batch_size", "Executed batch sizes", ["model"], buckets=_BATCH_BUCKETS,
                                    registry=r)
        self.inflight = Gauge("mmkd_inflight_requests", "Requests being handled", ["model"], registry=r)
        self.queue_depth = Gauge("mmkd_queue_depth", "Requests waiting in the batcher", ["model"], registry=r)
        self.dropped = Counter("mmkd_dropped", "Requests dropped before compute", ["model", "reason"], registry=r)
        self.model_info = Gauge("mmkd_model_info", "Served model and the execution provider in use",
                                ["model", "version", "variant", "provider"], registry=r)
        self.model_ready = Gauge("mmkd_model_ready", "1 when the model is warmed up and serving", ["model"],
                                 registry=r)
        self.model_process_deaths = Counter("mmkd_model_process_deaths", "Model processes that died while serving",
                                            ["model"], registry=r)
        self._http = None

    def observer(self, model: str) -> "ModelObserver":
        return ModelObserver(self, model)

    def start_http(self, host: str, port: int) -> int:
        """Serve /metrics; returns the bound port (port 0 picks a free one)."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        self._http = server
        return int(server.server_address[1])

    def stop_http(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None

    def mean_batch_size(self, model: str) -> float:
        """Mean executed batch size so far (what tests and benchmarks read)."""
        total = self.registry.get_sample_value("mmkd_batch_size_sum", {"model": model}) or 0.0
        count = self.registry.get_sample_value("mmkd_batch_size_count", {"model": model}) or 0.0
        return total / count if count else 0.0


class ModelObserver:
    """The batcher's view of the metrics for one model."""

    def __init__(self, metrics: ServerMetrics, model: str) -> None:
        self._m = metrics
        self._model = model

    def queue_depth(self, depth: int) -> None:
        self._m.queue_depth.labels(self._model).set(depth)

    def dropped(self, reason: str) -> None:
        self._m.dropped.labels(self._model, reason).inc()

    def batch(self, size: int, queue_s: Sequence[float], compute_s: float) -> None:
        self._m.batch_size.labels(self._model).observe(size)
        self._m.compute_seconds.labels(self._model).observe(compute_s)
        hist = self._m.queue_seconds.labels(self._model)
        for q in queue_s:
            hist.observe(q)
