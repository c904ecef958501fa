"""The engine both APIs call: model lookup, preprocessing off the event loop, one batcher per model.

Why one layer under both APIs: mmkd.v1 and KServe v2 must give the same answers, batch together and count in the
same metrics; they differ only in how they read requests and write responses.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import grpc
import numpy as np

from server.batcher import DynamicBatcher
from server.errors import NotReadyError, QueueFullError, ShuttingDownError
from server.metrics import ServerMetrics
from server.logs import fields
from server.model import ModelRegistry, Prepared, Raw, Row, ServedModel
from server.model_process import ProcessInstances
from server.settings import ServerSettings
from server.status import status_for

log = logging.getLogger("mmkd.server.engine")


@dataclass(frozen=True)
class Answer:
    """The logits row of one request and its server-side timings (seconds)."""

    logits: np.ndarray  # (C,) float32
    preprocess_s: float
    queue_s: float
    compute_s: float
    total_s: float
    batch_size: int


class Engine:
    """Owns the batchers and thread pools; created and closed inside the server's event loop."""

    def __init__(self, settings: ServerSettings, metrics: ServerMetrics) -> None:
        self.settings = settings
        self.models = ModelRegistry({})
        self.metrics = metrics
        self.loading = True  # until the server has loaded and warmed every model
        self.closing = False
        self._inflight = 0
        self._preprocessing: dict[str, int] = {}  # per model: admitted, not yet in the batcher's queue
        self._idle = asyncio.Event()
        self._idle.set()
        self._preprocess = ThreadPoolExecutor(settings.preprocess_threads, thread_name_prefix="mmkd-pre")
        self._compute: dict[str, ThreadPoolExecutor] = {}
        self._batchers: dict[str, DynamicBatcher[Prepared | Raw, Row]] = {}
        self._in_batch: dict[str, bool] = {}  # per model: small requests prepared by the compute thread
        self._processes: list[ProcessInstances] = []

    def add(self, model: ServedModel, processes: ProcessInstances | None = None) -> None:
        """Serve a loaded, warmed-up model (call inside the event loop: the batcher starts a task); with
        `processes` its batches run in those model processes, the executor threads only wait for them."""
        s = self.settings
        pool = ThreadPoolExecutor(s.instances, thread_name_prefix=f"mmkd-ort-{model.name}")
        run_batch = model.run_batch if processes is None else _lone_local(model, processes)
        inline = model.single_run_s * 1000.0 <= s.inline_compute_ms  # a lone request may run on the event loop
        if processes is not None:
            self._processes.append(processes)
        in_batch = schedule(s, model).preprocess_in_batch
        self._in_batch[model.name] = in_batch
        log.info("model_scheduling", extra=fields(
            model=model.name, instance_kind="process" if processes else "thread",
            preprocess_in="batch" if in_batch else "loop", inline_compute=inline,
            sample_compute_ms=round(model.sample_compute_s * 1000, 4),
            sample_preprocess_ms=round(model.sample_preprocess_s * 1000, 4),
            single_run_ms=round(model.single_run_s * 1000, 4)))
        self._compute[model.name] = pool
        self._batchers[model.name] = DynamicBatcher(
            run_batch, executor=pool, max_batch_size=s.max_batch_size,
            max_queue_delay_s=s.max_queue_delay_ms / 1000.0, max_queue_size=s.max_queue_size,
            instances=s.instances, eager_when_idle=s.eager_dispatch, inline_when_idle=inline,
            observer=self.metrics.observer(model.name))
        self.models.add(model)

    def model(self, name: str) -> ServedModel:
        """The named model (ModelNotFoundError lists the served ones; NotReadyError while loading)."""
        if self.loading and name not in self.models.names():
            raise NotReadyError("models are still loading and warming up; retry when health reports SERVING")
        return self.models.get(name)

    async def infer(self, model: ServedModel, image: bytes, text: str, *, deadline: float | None = None,
                    index: int | None = None) -> Answer:
        """Preprocess (inline or in the thread pool), then wait for the batcher; raises InputError and ServerError
        types."""
        if self.closing:
            raise ShuttingDownError("the server is shutting down and accepts no new requests")
        batcher = self._batchers[model.name]
        self._admit(model.name, batcher)
        start = time.monotonic()
        loop = asyncio.get_running_loop()
        self._inflight += 1
        self._idle.clear()
        try:  # admitted requests are counted so that close() lets them finish before the batchers close
            try:
                # Small images decode in ~0.1 ms; a thread-pool round trip per request costs more than that in
                # wake-ups and GIL hand-offs, so they are prepared inline: by the compute thread as part of their
                # batch, or on the event loop (ServedModel.preprocess_in_batch; measured: server/README.md).
                item: Prepared | Raw
                if len(image) > self.settings.inline_preprocess_bytes:
                    item = await loop.run_in_executor(self._preprocess,
                                                      lambda: model.prepare(image, text, index=index))
                elif self._in_batch[model.name]:
                    item = Raw(image, text, index)
                else:
                    item = model.prepare(image, text, index=index)
            finally:
                self._preprocessing[model.name] -= 1
            result = await batcher.submit(item, deadline=deadline)
        finally:
            self._inflight -= 1
            if self._inflight == 0:
                self._idle.set()
        row: Row = result.value
        return Answer(row.logits, row.preprocess_s, result.queue_s, row.compute_s, time.monotonic() - start,
                      result.batch_size)

    def _admit(self, name: str, batcher: DynamicBatcher) -> None:
        """Refuse before preprocessing when the queue is already full, so overload costs no decoding work and
        no unbounded backlog builds up in the preprocessing pool."""
        waiting = self._preprocessing.get(name, 0)
        if waiting + batcher.depth >= self.settings.max_queue_size:
            self.metrics.dropped.labels(name, "queue_full").inc()
            raise QueueFullError(f"queue full ({self.settings.max_queue_size} requests waiting); retry with backoff")
        self._preprocessing[name] = waiting + 1

    @contextmanager
    def track(self, model: str, api: str) -> Iterator[None]:
        """Count one request in flight, then by outcome code; the caller maps exceptions to statuses."""
        m = self.metrics
        m.inflight.labels(model).inc()
        start = time.monotonic()
        code = "OK"
        try:
            yield
        except asyncio.CancelledError:
            code = "CANCELLED"
            raise
        except BaseException as exc:
            code = status_for(exc)[0].name
            raise
        finally:
            m.inflight.labels(model).dec()
            m.requests.labels(model, api, code).inc()
            m.request_seconds.labels(model, api).observe(time.monotonic() - start)

    async def close(self) -> None:
        """Refuse new requests, finish everything queued or running, then stop the thread pools."""
        self.closing = True
        await self._idle.wait()
        await asyncio.gather(*(b.close() for b in self._batchers.values()))
        loop = asyncio.get_running_loop()
        for pool in (*self._compute.values(), self._preprocess):
            await loop.run_in_executor(None, pool.shutdown)
        for processes in self._processes:
            await loop.run_in_executor(None, processes.close)


@dataclass(frozen=True)
class Schedule:
    """Where one model's small requests are prepared and where its batches run."""

    preprocess_in_batch: bool  # by whatever runs the batch, not on the event loop
    in_process: bool  # in model processes, not in a thread of the server


def schedule(s: ServerSettings, model: ServedModel) -> Schedule:
    """Resolve `--preprocess-in` and `--instance-kind` for a warmed-up model.

    `auto` moves a model into processes exactly when its requests are best prepared with their batch (preparing
    costs more than computing): then the batch's preparation, run in a thread, holds the interpreter lock that
    the event loop needs, and a process of its own frees it (student: 2,118 vs 1,775 req/s at concurrency 32,
    server/README.md). A compute-bound model gains nothing there and would pay the pipe; with batching off
    (`--max-batch-size 1`) every batch is a batch of one, which runs on the server's own copy anyway."""
    in_batch = s.preprocess_in == "batch" or (s.preprocess_in == "auto" and model.preprocess_in_batch())
    if s.instance_kind == "process":
        return Schedule(s.preprocess_in != "loop", True)  # a model process prepares on its own interpreter
    return Schedule(in_batch, s.instance_kind == "auto" and in_batch and s.max_batch_size > 1)


def _lone_local(model: ServedModel, processes: ProcessInstances) -> Callable[[Sequence[Prepared | Raw]], list]:
    """Batches for the model processes, except a batch of one: the server's own copy of the model runs it in
    the executor thread. A lone request means the server is lightly loaded, where the interpreter lock is not
    contended and the pipe round trip (about 0.25 ms here) would be pure latency."""
    def run_batch(items: Sequence[Prepared | Raw]) -> list:
        return model.run_batch(items) if len(items) == 1 else processes.run_batch(items)
    return run_batch


def deadline_of(context: grpc.aio.ServicerContext) -> float | None:
    """The RPC's deadline as a time.monotonic() instant, or None when the client set none."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining
