"""The requests a load run sends, the two load shapes as one worker runs its share, and a memory sampler.

Open loop: request i is due at start + i / rate whatever the server does, and its latency counts from that due
time, so a server that falls behind shows it (no coordinated omission). The client caps its own outstanding
requests; arrivals past the cap are recorded as `CLIENT_OVERLOAD` so a slow client cannot hide as a fast server.

Both shapes take a `share=(k, n)`: worker k of n walks requests k, k+n, k+2n, ... of the one global schedule, so n
worker processes together send exactly what one infinitely fast client would (see `workers.py`).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from benchmarks.robustness import corpus
from benchmarks.robustness import images as im
from benchmarks.robustness.client import Caller
from benchmarks.robustness.corpus import Case

Share = tuple[int, int]  # (this worker's index, number of workers)


@dataclass(frozen=True)
class Record:
    """One request of a load run."""

    due_s: float  # when it was due, seconds from the phase start
    latency_s: float  # from the due time: what a caller arriving then waits (includes client lag)
    rtt_s: float  # from the moment the client really sent it: what the server made it wait
    code: str
    valid: bool
    expected: bool  # the code is in the case's oracle

    @property
    def sent_s(self) -> float:
        """When the client really sent it, seconds from the phase start (due time plus the client's lag)."""
        return self.due_s + self.latency_s - self.rtt_s


def p(values: list[float], q: float) -> float | None:
    """Percentile q (0-100) in milliseconds, or None for no values."""
    return None if not values else round(float(np.percentile(np.asarray(values), q)) * 1000.0, 2)


def valid_maker(model: str, kinds: int = 8, image_size: int = 32) -> Callable[[int], Case]:
    """Request i: one of a few pre-encoded valid requests over both APIs. Images over 64 px are JPEG, as photos
    are: decoding them is real per-request work for the server (and next to none for the client)."""
    cases = []
    for i in range(kinds):
        image = im.rgb(500 + i, size=image_size, fmt="JPEG" if image_size > 64 else "PNG")
        text = corpus.GOOD_TEXT
        cases.append(Case("valid", "mmkd", corpus.classify(model, image, text), corpus.OK) if i % 2 == 0 else
                     Case("valid", "kserve", corpus.infer(model, [image], [text.encode()]), corpus.OK))
    return lambda i: cases[i % len(cases)]


def mixed_maker(model: str, invalid_ratio: float, seed: int = 0, image_size: int = 32) -> Callable[[int], Case]:
    """Valid requests with every 1/invalid_ratio-th one drawn from the fuzz generator."""
    valid = valid_maker(model, image_size=image_size)
    if invalid_ratio <= 0:
        return valid
    invalid = [c for c in corpus.generate(model, 500, seed) if c.malformed]
    every = max(1, round(1 / invalid_ratio))
    return lambda i: invalid[i % len(invalid)] if i % every == every - 1 else valid(i)


async def closed_loop(caller: Caller, make: Callable[[int], Case], concurrency: int, duration_s: float, *,
                      timeout_s: float = 10.0, share: Share = (0, 1)) -> list[Record]:
    """This worker's callers of `concurrency` in all, each sending its next request when the last is answered
    (capacity: the OK count over the duration)."""
    k, n = share
    start = time.monotonic()
    stop = start + duration_s
    records: list[Record] = []
    sequence = iter(range(k, 1 << 62, n))

    async def one_caller() -> None:
        while time.monotonic() < stop:
            case = make(next(sequence))
            sent = time.monotonic()
            outcome = await caller.call(case, timeout_s)
            records.append(Record(sent - start, outcome.latency_s, outcome.latency_s, outcome.code, case.valid,
                                  outcome.code in case.expect))

    await asyncio.gather(*(one_caller() for _ in range(k, concurrency, n)))
    return records


async def open_loop(caller: Caller, make: Callable[[int], Case], rate: float, duration_s: float, *,
                    timeout_s: float, max_outstanding: int = 2000, share: Share = (0, 1)) -> list[Record]:
    """This worker's share of `rate` requests/s (all workers together) for `duration_s`; `make(i)` builds
    request i. Returns one record per request of the share, answered, failed or not sent (CLIENT_OVERLOAD)."""
    k, n = share
    records: list[Record] = []
    tasks: set[asyncio.Task] = set()
    start = time.monotonic()

    async def one(i: int, due: float) -> None:
        case = make(i)
        outcome = await caller.call(case, timeout_s)
        records.append(Record(due - start, time.monotonic() - due, outcome.latency_s, outcome.code,
                              case.valid, outcome.code in case.expect))

    for i in range(k, int(rate * duration_s), n):
        due = start + i / rate
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        if len(tasks) >= max_outstanding:
            records.append(Record(due - start, 0.0, 0.0, "CLIENT_OVERLOAD", True, False))
            continue
        task = asyncio.create_task(one(i, due))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.wait(set(tasks))
    return records


class MemorySampler:
    """Samples a process's resident memory every `every_s` seconds on a thread: [(t, MiB)]. A thread, because
    the parent spends a load run blocked on its worker processes, not in an event loop."""

    def __init__(self, read_mb: Callable[[], float], every_s: float = 1.0) -> None:
        self._read = read_mb
        self._every = every_s
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._start = time.monotonic()

    def _run(self) -> None:
        while True:
            try:
                self.samples.append((round(time.monotonic() - self._start, 2), round(self._read(), 1)))
            except (OSError, RuntimeError):  # the process is gone: the crash shows elsewhere
                return
            if self._stop.wait(self._every):
                return

    def __enter__(self) -> "MemorySampler":
        self._start = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def at(self, t: float) -> float | None:
        """The first sample taken at or after t seconds."""
        later = [mb for when, mb in self.samples if when >= t]
        return later[0] if later else (self.samples[-1][1] if self.samples else None)
