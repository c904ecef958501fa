"""Assemble and run the server: load models, start gRPC (own API, KServe v2, health, reflection), metrics,
and shut down gracefully.

Order matters. At start the port opens first with health NOT_SERVING, so liveness answers while models load and
warm up in a thread; only then does health turn SERVING. At stop, health turns NOT_SERVING (load balancers
drain), new requests are refused with UNAVAILABLE, queued and running requests finish, then gRPC stops with a
grace period and the batchers and thread pools close.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import grpc
from google.protobuf import descriptor_pool
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2

from server._proto.kserve.v2 import grpc_service_pb2 as kserve_pb
from server._proto.kserve.v2 import grpc_service_pb2_grpc as kserve_grpc
from server._proto.mmkd.v1 import inference_pb2 as mmkd_pb
from server._proto.mmkd.v1 import inference_pb2_grpc as mmkd_grpc
from server.api_kserve import KServeServicer
from server.api_v1 import InferenceServicer
from server.auth import BearerTokenInterceptor, read_tokens
from server.engine import Engine, schedule
from server.errors import ConfigError, ServerError
from server.logs import fields
from server.metrics import ServerMetrics
from server.model import ServedModel, discover, load_model
from server.model_process import ModelProcess, ProcessInstances
from server.runtime import parse_device
from server.settings import ServerSettings

log = logging.getLogger("mmkd.server")
SERVICES = ("mmkd.v1.Inference", "inference.GRPCInferenceService")
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class InferenceServer:
    """One server: `await start()`, then `await wait_for_termination()` or `await stop()`."""

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.metrics = ServerMetrics()
        self.health = health.aio.HealthServicer()
        self.engine = Engine(settings, self.metrics)
        self.port: int | None = None
        self.metrics_port: int | None = None
        self.rpc_limit: int | None = None  # maximum_concurrent_rpcs, fixed at start()
        self._server: grpc.aio.Server | None = None
        self._stopped = asyncio.Event()
        self._stopping: asyncio.Task | None = None

    async def start(self) -> int:
        """Open the port, load and warm every model, turn health SERVING; returns the bound gRPC port."""
        s = self.settings
        # Past this many RPCs in the server, gRPC answers RESOURCE_EXHAUSTED before any handler runs (a stream counts
        # once), so a backlog cannot build up in front of the batchers' own queue check.
        self.rpc_limit = s.rpc_limit(self._model_count())
        self._server = grpc.aio.server(interceptors=self._interceptors(), maximum_concurrent_rpcs=self.rpc_limit,
                                       options=[("grpc.max_receive_message_length", s.max_message_bytes),
                                                ("grpc.max_send_message_length", s.max_message_bytes),
                                                ("grpc.so_reuseport", int(s.reuse_port))])
        for service in ("", *SERVICES):
            await self._set_health(service, NOT_SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        mmkd_grpc.add_InferenceServicer_to_server(InferenceServicer(self.engine), self._server)
        kserve_grpc.add_GRPCInferenceServiceServicer_to_server(KServeServicer(self.engine), self._server)
        _enable_reflection(self._server)
        self.port = self._bind()
        if s.metrics_port is not None:
            self.metrics_port = self.metrics.start_http(s.host, s.metrics_port)
        await self._server.start()
        log.info("listening", extra=fields(address=f"{s.host}:{self.port}", metrics_port=self.metrics_port,
                                           tls=s.tls_cert is not None, auth=s.auth_token_file is not None,
                                           max_concurrent_rpcs=self.rpc_limit))
        models = await asyncio.get_running_loop().run_in_executor(None, self._load_models)
        for model, processes in models:
            self.engine.add(model, processes)
            for process in processes.processes if processes else ():
                process.on_health = self._health_reporter(model.name)
                process.on_death = lambda _code, name=model.name: self.metrics.model_process_deaths.labels(name).inc()
            self.metrics.model_ready.labels(model.name).set(1)
            await self._set_health(model.name, SERVING)
        self.engine.loading = False
        for service in ("", *SERVICES):
            await self._set_health(service, SERVING)
        log.info("serving", extra=fields(port=self.port, models=self.engine.models.names(), settings=s.to_dict()))
        return self.port

    def _model_count(self) -> int:
        """How many models the derived RPC limit must make room for (a bad repository fails later, in loading)."""
        if self.settings.models:
            return len(self.settings.models)
        try:
            return len(discover(self.settings.model_repository))
        except (ServerError, OSError):
            return 1

    def _interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        s = self.settings
        if s.auth_token_file is None:
            return []
        return [BearerTokenInterceptor(read_tokens(s.auth_token_file), protect_health=s.auth_health)]

    def _bind(self) -> int:
        s = self.settings
        try:
            if s.tls_cert is None:
                port = self._server.add_insecure_port(s.address)
            else:
                creds = grpc.ssl_server_credentials([(s.tls_key.read_bytes(), s.tls_cert.read_bytes())])
                port = self._server.add_secure_port(s.address, creds)
        except OSError as exc:
            raise ConfigError(f"cannot read TLS key/certificate: {exc}") from exc
        except RuntimeError as exc:  # grpcio raises RuntimeError when bind fails
            raise ConfigError(f"cannot bind {s.address}: port in use or not a local address ({exc})") from exc
        if port == 0:
            raise ConfigError(f"cannot bind {s.address}: port in use or not a local address")
        return port

    def _load_models(self) -> list[tuple[ServedModel, ProcessInstances | None]]:
        """Runs in a worker thread: bundle verification, session creation, warm-up and starting model processes
        are blocking. The server keeps its own copy of each model for its warm-up timings, labels and tokenizer."""
        s = self.settings
        device = parse_device(s.device)
        models = []
        for name, folder in discover(s.model_repository, s.models).items():
            start = time.monotonic()
            model = load_model(name, folder, device, s.limits, intra_op_threads=s.ort_threads,
                               spinning=s.intra_op_spinning, max_batch_size=s.max_batch_size)
            self.metrics.model_info.labels(name, model.version, model.spec.variant, model.provider).set(1)
            log.info("model_loaded", extra=fields(model=name, version=model.version, variant=model.spec.variant,
                                                  provider=model.provider, device_id=model.runner.device_id,
                                                  path=str(model.bundle.path),
                                                  load_s=round(time.monotonic() - start, 3)))
            in_process = schedule(s, model).in_process
            models.append((model, self._start_processes(model) if in_process else None))
        return models

    def _start_processes(self, model: ServedModel) -> ProcessInstances:
        """`--instances` model processes on the variant and the device the server's own copy got."""
        s = self.settings
        start = time.monotonic()
        processes = ProcessInstances([
            ModelProcess(model.name, model.bundle.path, model.runner.placed, s.limits, intra_op_threads=s.ort_threads,
                         spinning=s.intra_op_spinning, max_batch_size=s.max_batch_size, log_format=s.log_format)
            for _ in range(s.instances)])
        log.info("model_processes", extra=fields(model=model.name, pids=[p.pid for p in processes.processes],
                                                 start_s=round(time.monotonic() - start, 3)))
        return processes

    def _health_reporter(self, model: str) -> Callable[[bool], None]:
        """For a model process (called from an executor thread): a model whose process cannot start again is
        NOT_SERVING under its own name and in `mmkd_model_ready` until one does."""
        loop = asyncio.get_running_loop()

        def report(healthy: bool) -> None:
            log.log(logging.INFO if healthy else logging.ERROR, "model_health",
                    extra=fields(model=model, serving=healthy))
            self.metrics.model_ready.labels(model).set(1 if healthy else 0)
            if not self.engine.closing:
                asyncio.run_coroutine_threadsafe(self._set_health(model, SERVING if healthy else NOT_SERVING), loop)
        return report

    async def _set_health(self, service: str, status: int) -> None:
        await self.health.set(service, status)

    async def stop(self, grace: float | None = None) -> None:
        """Health NOT_SERVING, refuse new requests, finish in-flight ones, stop gRPC, close batchers.

        Safe to call more than once and concurrently: every caller waits for the one shutdown."""
        if self._stopping is None:
            self._stopping = asyncio.ensure_future(self._stop(grace))
        await asyncio.shield(self._stopping)

    async def _stop(self, grace: float | None) -> None:
        grace = self.settings.grace_s if grace is None else grace
        log.info("draining", extra=fields(grace_s=grace))
        await self.health.enter_graceful_shutdown()
        for model in self.engine.models:
            self.metrics.model_ready.labels(model.name).set(0)
        drain = asyncio.ensure_future(self.engine.close())
        try:
            await asyncio.wait_for(asyncio.shield(drain), grace)
        except asyncio.TimeoutError:
            log.warning("drain_timeout", extra=fields(grace_s=grace))
        if self._server is not None:
            await self._server.stop(grace)
        self.metrics.stop_http()
        self._stopped.set()
        log.info("stopped")

    async def wait_for_termination(self) -> None:
        """Return once stop() has completed (from any caller)."""
        await self._stopped.wait()
        if self._stopping is not None:
            await asyncio.shield(self._stopping)


def _enable_reflection(server: grpc.aio.Server) -> None:
    """Reflection over a private pool holding every served file (the KServe stubs live outside the default pool)."""
    pool = descriptor_pool.DescriptorPool()
    for module in (health_pb2, reflection_pb2, mmkd_pb, kserve_pb):
        pool.AddSerializedFile(module.DESCRIPTOR.serialized_pb)
    names = (*SERVICES, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME)
    reflection.enable_server_reflection(names, server, pool=pool)
