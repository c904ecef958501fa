"""The dynamic batcher: one per model, in the spirit of Ray Serve's `serve/batching.py`.

Requests wait in a queue of (item, future) records. A background task forms a batch as soon as `max_batch_size`
requests wait or `max_queue_delay` has passed since the oldest one arrived, whichever comes first, and only when
one of `instances` run slots is free, so while every slot is busy the queue grows into the next, bigger batch.
With `eager_when_idle` (the default) a request that finds no batch running is not held for the delay: an idle
model instance gains nothing by waiting, and under load the batches still form while the previous batch
computes. Without it the batcher behaves like Triton's: the oldest request always waits up to the delay. With
`inline_when_idle` a request that finds the model idle and nothing queued runs in the caller's coroutine, on the
event loop: for a model whose batch of 1 takes a fraction of a millisecond, the two thread hand-offs cost more
than the compute (the engine enables it per model from its warm-up timing).
Batches run in executor threads (ONNX Runtime releases the GIL). Every future is resolved or failed: a batch
that raises, or returns the wrong number of results, fails every request in it; a result that is an exception
fails its own request only (a malformed input found while preparing the batch). Requests whose client cancelled
or whose deadline passed while queued are dropped before compute. A full queue refuses at once.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from server.errors import BatchError, DeadlineExpiredError, QueueFullError, ShuttingDownError

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class BatchResult(Generic[R]):
    """One request's result and where its time went."""

    value: R
    queue_s: float
    compute_s: float
    batch_size: int


class BatchObserver(Protocol):
    """What the batcher reports (metrics implement it)."""

    def queue_depth(self, depth: int) -> None: ...
    def dropped(self, reason: str) -> None: ...
    def batch(self, size: int, queue_s: Sequence[float], compute_s: float) -> None: ...


class _NullObserver:
    def queue_depth(self, depth: int) -> None:
        pass

    def dropped(self, reason: str) -> None:
        pass

    def batch(self, size: int, queue_s: Sequence[float], compute_s: float) -> None:
        pass


@dataclass
class _Pending:
    item: Any
    future: asyncio.Future
    enqueued: float
    deadline: float | None  # time.monotonic() value


class DynamicBatcher(Generic[T, R]):
    """Group concurrent `submit` calls into batches for `run_batch(items) -> results` (one result per item)."""

    def __init__(self, run_batch: Callable[[list[T]], Sequence[R]], *, executor: Executor, max_batch_size: int,
                 max_queue_delay_s: float, max_queue_size: int, instances: int = 1,
                 eager_when_idle: bool = True, inline_when_idle: bool = False,
                 observer: BatchObserver | None = None) -> None:
        self._run_batch = run_batch
        self._executor = executor
        self.max_batch_size = max_batch_size
        self.max_queue_delay_s = max_queue_delay_s
        self.max_queue_size = max_queue_size
        self.eager_when_idle = eager_when_idle
        self.inline_when_idle = inline_when_idle and eager_when_idle  # never skip a delay the user asked for
        self._lone = False  # a request is checking whether it may run inline
        self._slots = asyncio.Semaphore(instances)
        self._active = 0  # batches computing now
        self._observer = observer or _NullObserver()
        self._queue: collections.deque[_Pending] = collections.deque()
        self._arrived = asyncio.Event()
        self._closing = False
        self._running: set[asyncio.Task] = set()
        self._loop_task = asyncio.get_running_loop().create_task(self._loop())

    @property
    def depth(self) -> int:
        return len(self._queue)

    async def submit(self, item: T, *, deadline: float | None = None) -> BatchResult[R]:
        """Queue one item and wait for its result; `deadline` is a time.monotonic() instant."""
        if self._closing:
            raise ShuttingDownError("the server is shutting down and accepts no new requests")
        if len(self._queue) >= self.max_queue_size:
            self._prune_cancelled()
            if len(self._queue) >= self.max_queue_size:
                self._observer.dropped("queue_full")
                raise QueueFullError(f"queue full ({self.max_queue_size} requests waiting); retry with backoff")
        first = False
        if self.inline_when_idle and self._active == 0 and not self._queue and not self._lone:
            if await self._stays_alone():
                return self._run_inline(item)
            first = True  # others arrived while this one looked: it batches with them, first in line
        future = asyncio.get_running_loop().create_future()
        pending = _Pending(item, future, time.monotonic(), deadline)
        if first:
            self._queue.appendleft(pending)
        else:
            self._queue.append(pending)
        self._observer.queue_depth(len(self._queue))
        self._arrived.set()
        return await future  # a cancelled caller cancels the future; the batch former then skips it

    async def close(self) -> None:
        """Refuse new work, run everything already queued without waiting for delays, and wait for it."""
        self._closing = True
        self._arrived.set()
        await self._loop_task
        if self._running:
            await asyncio.wait(set(self._running))

    # -- the background task ---------------------------------------------------------------------------------

    async def _loop(self) -> None:
        try:
            await self._form_batches()
        except BaseException as exc:  # a bug here must not leave callers hanging: fail whatever is queued
            while self._queue:
                pending = self._queue.popleft()
                if not pending.future.done():
                    pending.future.set_exception(BatchError(f"batcher stopped unexpectedly: {exc!r}"))
            self._closing = True
            raise

    async def _form_batches(self) -> None:
        while True:
            if not self._queue:
                if self._closing:
                    return
                self._arrived.clear()
                await self._arrived.wait()
                continue
            await self._slots.acquire()
            if not (self.eager_when_idle and self._active == 0):
                await self._wait_for_batch()
            batch = self._take_batch()
            if not batch:
                self._slots.release()
                continue
            self._active += 1
            task = asyncio.get_running_loop().create_task(self._run(batch))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _wait_for_batch(self) -> None:
        """Wait until a full batch waits or the oldest request has waited max_queue_delay (only the remainder)."""
        while self._queue and len(self._queue) < self.max_batch_size and not self._closing:
            remaining = self._queue[0].enqueued + self.max_queue_delay_s - time.monotonic()
            if remaining <= 0:
                return
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except asyncio.TimeoutError:
                return

    def _take_batch(self) -> list[_Pending]:
        batch: list[_Pending] = []
        now = time.monotonic()
        while self._queue and len(batch) < self.max_batch_size:
            pending = self._queue.popleft()
            if pending.future.done():  # the client cancelled (gRPC cancels the handler when its deadline passes)
                expired = pending.deadline is not None and pending.deadline <= now
                self._observer.dropped("expired" if expired else "cancelled")
            elif pending.deadline is not None and pending.deadline <= now:
                pending.future.set_exception(DeadlineExpiredError(
                    f"deadline passed after {now - pending.enqueued:.3f}s in the queue; request not computed"))
                self._observer.dropped("expired")
            else:
                batch.append(pending)
        self._observer.queue_depth(len(self._queue))
        return batch

    def _prune_cancelled(self) -> None:
        kept = [p for p in self._queue if not p.future.done()]
        for _ in range(len(self._queue) - len(kept)):
            self._observer.dropped("cancelled")
        self._queue = collections.deque(kept)

    async def _stays_alone(self) -> bool:
        """Let every request that is ready on the event loop reach the batcher first: under load they queue up
        behind this one and all batch together; a request still alone after that runs inline."""
        self._lone = True
        try:
            await asyncio.sleep(0)
        finally:
            self._lone = False
        return self._active == 0 and not self._queue and not self._closing

    def _run_inline(self, item: T) -> BatchResult[R]:
        """A batch of one on the event loop; no await inside, so no other batch can start meanwhile."""
        start = time.monotonic()
        results = self._run_batch([item])
        if len(results) != 1:
            raise BatchError(f"run_batch returned {len(results)} results for 1 request")
        compute = time.monotonic() - start
        self._observer.batch(1, [0.0], compute)
        if isinstance(results[0], BaseException):
            raise results[0]
        return BatchResult(results[0], 0.0, compute, 1)

    async def _run(self, batch: list[_Pending]) -> None:
        start = time.monotonic()
        try:
            results = await asyncio.get_running_loop().run_in_executor(
                self._executor, self._run_batch, [p.item for p in batch])
            if len(results) != len(batch):
                raise BatchError(f"run_batch returned {len(results)} results for {len(batch)} requests")
        except BaseException as exc:  # noqa: BLE001 - every caller must hear about it, even on cancellation
            self._fail(batch, exc)
            if not isinstance(exc, Exception):
                raise
            return
        finally:
            self._active -= 1
            self._slots.release()
        compute = time.monotonic() - start
        queue_times = [start - p.enqueued for p in batch]
        self._observer.batch(len(batch), queue_times, compute)
        for pending, value, queued in zip(batch, results, queue_times):
            if pending.future.done():
                continue
            if isinstance(value, BaseException):
                pending.future.set_exception(value)
            else:
                pending.future.set_result(BatchResult(value, queued, compute, len(batch)))

    @staticmethod
    def _fail(batch: list[_Pending], exc: BaseException) -> None:
        for pending in batch:
            if not pending.future.done():
                if isinstance(exc, asyncio.CancelledError):
                    pending.future.cancel()
                else:
                    pending.future.set_exception(exc)
