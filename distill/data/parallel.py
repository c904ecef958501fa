"""Map a function over tasks in worker processes, results in task order: dataset generation and decoding.

Why a helper: both jobs are CPU-bound Python on many small files, and the safe start method depends on the
caller. `fork` is fastest but unsafe once a process runs threads (torch's thread pools, a server), so it is
used only from a single-threaded process without torch; otherwise `forkserver` (or `spawn` off Linux).
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def default_workers() -> int:
    """CPU cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def map_in_processes(fn: Callable[[T], R], tasks: Sequence[T], workers: int | None = None) -> list[R]:
    """[fn(t) for t in tasks], spread over up to `workers` processes; one worker or one task runs inline.

    `fn` must be a module-level function and tasks picklable. An exception in a task is re-raised here.
    """
    workers = min(workers or default_workers(), len(tasks))
    if workers <= 1:
        return [fn(task) for task in tasks]
    with ProcessPoolExecutor(max_workers=workers, mp_context=_context()) as pool:
        return list(pool.map(fn, tasks))


def _context() -> multiprocessing.context.BaseContext:
    methods = multiprocessing.get_all_start_methods()
    if "fork" in methods and "torch" not in sys.modules and threading.active_count() == 1:
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
