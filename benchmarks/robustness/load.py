"""Closed-loop capacity measurement, an open-loop request stream, and a memory sampler.

Open loop: request i is due at start + i / rate whatever the server does, and its latency counts from that due
time, so a server that falls behind shows it (no coordinated omission). The client caps its own outstanding
requests; arrivals past the cap are recorded as `CLIENT_OVERLOAD` so a slow client cannot hide as a fast server.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from benchmarks.robustness.client import Caller
from benchmarks.robustness.corpus import Case


@dataclass(frozen=True)
class Record:
    """One request of a load run."""

    due_s: float  # when it was due, seconds from the run start
    latency_s: float  # from the due time: what a caller arriving then waits (includes client lag)
    rtt_s: float  # from the moment the client really sent it: what the server made it wait
    code: str
    valid: bool
    expected: bool  # the code is in the case's oracle


def p(values: list[float], q: float) -> float | None:
    """Percentile q (0-100) in milliseconds, or None for no values."""
    return None if not values else round(float(np.percentile(np.asarray(values), q)) * 1000.0, 2)


async def capacity(caller: Caller, make: Callable[[int], Case], duration_s: float, concurrency: int = 32,
                   timeout_s: float = 10.0) -> float:
    """Requests per second answered OK by `concurrency` closed-loop workers."""
    stop = time.monotonic() + duration_s
    ok = 0
    counter = 0

    async def worker() -> None:
        nonlocal ok, counter
        while time.monotonic() < stop:
            counter += 1
            outcome = await caller.call(make(counter), timeout_s)
            ok += outcome.code == "OK"

    start = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return ok / (time.monotonic() - start)


async def open_loop(caller: Caller, make: Callable[[int], Case], rate: float, duration_s: float, *,
                    timeout_s: float, max_outstanding: int = 2000, offset_s: float = 0.0) -> list[Record]:
    """Send `rate` requests/s for `duration_s`; `make(i)` builds request i. Returns one record per request."""
    records: list[Record] = []
    tasks: set[asyncio.Task] = set()
    start = time.monotonic()
    total = int(rate * duration_s)

    async def one(i: int, due: float) -> None:
        case = make(i)
        outcome = await caller.call(case, timeout_s)
        records.append(Record(offset_s + due - start, time.monotonic() - due, outcome.latency_s, outcome.code,
                              case.valid, outcome.code in case.expect))

    for i in range(total):
        due = start + i / rate
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        if len(tasks) >= max_outstanding:
            records.append(Record(offset_s + due - start, 0.0, 0.0, "CLIENT_OVERLOAD", True, False))
            continue
        task = asyncio.create_task(one(i, due))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.wait(set(tasks))
    return records


class MemorySampler:
    """Samples a process's resident memory every `every_s` seconds in the background: [(t, MiB)]."""

    def __init__(self, read_mb: Callable[[], float], every_s: float = 1.0) -> None:
        self._read = read_mb
        self._every = every_s
        self.samples: list[tuple[float, float]] = []
        self._task: asyncio.Task | None = None
        self._start = time.monotonic()

    async def _run(self) -> None:
        while True:
            try:
                self.samples.append((round(time.monotonic() - self._start, 2), round(self._read(), 1)))
            except (OSError, RuntimeError):  # the process is gone: the crash shows elsewhere
                return
            await asyncio.sleep(self._every)

    def __enter__(self) -> "MemorySampler":
        self._start = time.monotonic()
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    def __exit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()

    def at(self, t: float) -> float | None:
        """The first sample taken at or after t seconds."""
        later = [mb for when, mb in self.samples if when >= t]
        return later[0] if later else (self.samples[-1][1] if self.samples else None)
