"""Load from several processes, merged as if one client had sent it.

One Python process cannot offer 2x the capacity of a server that batches well: its own event loop saturates
first, and the overload check then measures the client. So the load is split over worker processes, each with its
own grpc.aio channel and event loop. Worker k of n sends requests k, k+n, k+2n, ... of the one global schedule
(`load.py`), so the merged records are exactly one schedule at the full rate, and the same summaries apply.

A worker is started once, connects, and then runs the phases the parent sends it, one at a time; each phase's
records come back before the next one starts, so the parent can read memory and metrics between phases. Workers
are spawned, not forked: the parent may host a gRPC server (the tests do), and gRPC does not survive fork.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import queue
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, replace
from itertools import chain

import grpc

from benchmarks.errors import BenchError
from benchmarks.robustness.client import CHANNEL_OPTIONS, Caller
from benchmarks.robustness.corpus import Case
from benchmarks.robustness.load import Record, closed_loop, mixed_maker, open_loop

START_MARGIN_S = 0.2  # every worker gets a phase before it starts, so all start together
READY_TIMEOUT_S = 120.0  # spawning imports grpc, numpy and the corpus: slow on a busy machine


def default_workers() -> int:
    """One worker per core, at least 2 and at most 16: a core is the unit of sending power (one event loop fills
    one), and a worker with little to do costs only its memory."""
    return max(2, min(16, os.cpu_count() or 2))


@dataclass(frozen=True)
class Phase:
    """One phase for all workers together: open loop at `rate` requests/s, or closed loop with `concurrency`
    requests in flight when `rate` is 0. `max_outstanding` is each worker's cap."""

    duration_s: float
    timeout_s: float
    rate: float = 0.0
    concurrency: int = 0
    invalid_ratio: float = 0.0
    max_outstanding: int = 2000
    start_at: float = 0.0  # wall clock (time.time()), set by the pool when it sends the phase


async def _run_phases(address: str, model: str, seed: int, share: tuple[int, int], inbox: mp.Queue,
                      outbox: mp.Queue, image_size: int) -> None:
    """A worker's life: connect, say ready, then run phases from `inbox` until None, returning records."""
    makers: dict[float, Callable[[int], Case]] = {}
    async with grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
        caller = Caller(channel)
        # a first call, so that no phase pays the connection set-up
        warm = await caller.call(mixed_maker(model, 0.0, image_size=image_size)(share[0]), 10.0)
        outbox.put((share[0], "ready", warm.code))
        while (phase := await asyncio.to_thread(inbox.get)) is not None:
            if phase.invalid_ratio not in makers:
                makers[phase.invalid_ratio] = mixed_maker(model, phase.invalid_ratio, seed, image_size)
            make = makers[phase.invalid_ratio]
            await asyncio.sleep(max(0.0, phase.start_at - time.time()))
            if phase.rate > 0:
                records = await open_loop(caller, make, phase.rate, phase.duration_s, timeout_s=phase.timeout_s,
                                          max_outstanding=phase.max_outstanding, share=share)
            else:
                records = await closed_loop(caller, make, phase.concurrency, phase.duration_s,
                                            timeout_s=phase.timeout_s, share=share)
            outbox.put((share[0], "records", records))


def _worker(address: str, model: str, seed: int, share: tuple[int, int], inbox: mp.Queue, outbox: mp.Queue,
            image_size: int) -> None:
    """Process entry point: any failure goes back to the parent as text instead of a silent exit."""
    try:
        asyncio.run(_run_phases(address, model, seed, share, inbox, outbox, image_size))
    except BaseException:  # noqa: BLE001 - reported to the parent, which raises it
        outbox.put((share[0], "error", traceback.format_exc()))


class LoadPool:
    """`workers` processes sending to `model` at `address`. Use as a context manager; `run(phase)` runs one phase
    on every worker and returns all their records, ordered by due time."""

    def __init__(self, address: str, model: str, workers: int, seed: int = 0, image_size: int = 32) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, not {workers}")
        ctx = mp.get_context("spawn")
        self.workers = workers
        self._outbox: mp.Queue = ctx.Queue()
        self._inboxes: list[mp.Queue] = [ctx.Queue() for _ in range(workers)]
        self._procs = [ctx.Process(target=_worker,
                                   args=(address, model, seed, (k, workers), inbox, self._outbox, image_size),
                                   name=f"load-worker-{k}", daemon=True)
                       for k, inbox in enumerate(self._inboxes)]

    def __enter__(self) -> "LoadPool":
        for proc in self._procs:
            proc.start()
        try:
            codes = self._gather("ready", READY_TIMEOUT_S)
            if set(codes) != {"OK"}:
                raise BenchError(f"load workers got no answer from the server before the run: {codes}")
        except BaseException:
            self.__exit__()
            raise
        return self

    def run(self, phase: Phase) -> list[Record]:
        """Run `phase` on every worker at once; block until all of them have finished it."""
        phase = replace(phase, start_at=time.time() + START_MARGIN_S)
        for inbox in self._inboxes:
            inbox.put(phase)
        parts = self._gather("records", START_MARGIN_S + phase.duration_s + phase.timeout_s + 60.0)
        return sorted(chain.from_iterable(parts), key=lambda r: r.due_s)

    def _gather(self, kind: str, timeout_s: float) -> list:
        """One `kind` message from every worker, in worker order; a worker's error or death raises BenchError."""
        got: dict[int, object] = {}
        deadline = time.monotonic() + timeout_s
        while len(got) < self.workers:
            try:
                k, what, payload = self._outbox.get(timeout=1.0)
            except queue.Empty:
                dead = [p.name for p in self._procs if p.exitcode is not None]
                if dead or time.monotonic() > deadline:
                    raise BenchError(f"load workers {dead or 'all alive'} sent no {kind!r} within "
                                     f"{timeout_s:.0f} s") from None
                continue
            if what == "error":
                raise BenchError(f"load worker {k} failed:\n{payload}")
            got[k] = payload
        return [got[k] for k in range(self.workers)]

    def __exit__(self, *exc: object) -> None:
        for inbox in self._inboxes:
            inbox.put(None)
        for proc in self._procs:
            proc.join(timeout=10.0)
            if proc.is_alive():  # stuck: stop this worker (our own child, by its handle)
                proc.terminate()
                proc.join(timeout=5.0)
