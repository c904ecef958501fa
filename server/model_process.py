"""A model instance in a process of its own: `--instance-kind process`.

Why: one server process runs its event loop, gRPC's Python side, preprocessing and ONNX Runtime's Python glue
under one interpreter lock, so it keeps about one core busy however many the host has; preparing a batch in the
compute thread slows the event loop that admits and answers requests, and the other way round. A model process
prepares and computes whole batches on its own interpreter, as Triton's Python backend runs each model instance
in a stub process and TorchServe runs its handlers in worker processes. The price is a pipe round trip per batch
(the batch's encoded images go one way, its logits the other) and a second copy of the model in memory; a lone
request would pay the round trip in full, so the engine runs batches of one on the server's own copy.
"""

from __future__ import annotations

import logging
import multiprocessing
import queue
import signal
import threading
import traceback
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from pathlib import Path

from export.bundle import InputLimits

from server.errors import BatchError, ModelLoadError
from server.logs import setup_logging
from server.model import Prepared, Raw, Row, load_model
from server.runtime import Device

log = logging.getLogger("mmkd.server.model_process")
START_TIMEOUT_S = 300.0  # loading, verifying and warming up a bundle; a big model on a slow disk takes a while


class ModelProcess:
    """One child process holding its own copy of one bundle; `run_batch` blocks the calling (executor) thread,
    not the interpreter lock, while the child works."""

    def __init__(self, name: str, folder: Path, device: Device, limits: InputLimits, *, intra_op_threads: int,
                 spinning: bool, max_batch_size: int, log_format: str = "json") -> None:
        self.name = name
        self._args = (name, str(folder), device, limits, intra_op_threads, spinning, max_batch_size, log_format)
        self._lock = threading.Lock()  # one batch at a time per process
        self._process: multiprocessing.process.BaseProcess | None = None
        self._conn: Connection | None = None
        self.on_health: Callable[[bool], None] | None = None  # told False when a restart fails, True when one works
        self.on_death: Callable[[int | None], None] | None = None  # told the exit code of a process that died
        self._failed = False
        self._start()

    def _start(self) -> None:
        ctx = multiprocessing.get_context("spawn")  # never fork a process that runs gRPC and ORT threads
        parent, child = ctx.Pipe()
        process = ctx.Process(target=_child_main, args=(child, *self._args), name=f"mmkd-model-{self.name}",
                              daemon=True)
        process.start()
        child.close()
        if not parent.poll(START_TIMEOUT_S):
            process.kill()
            raise ModelLoadError(f"model {self.name}: its model process did not start in {START_TIMEOUT_S:.0f} s")
        try:
            status, detail = parent.recv()
        except (EOFError, OSError):
            status, detail = "error", f"the process exited with code {process.join(5) or process.exitcode}"
        if status != "ready":
            process.join(5)
            raise ModelLoadError(f"model {self.name}: model process failed to load: {detail}")
        self._process, self._conn = process, parent

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def run_batch(self, items: Sequence[Prepared | Raw]) -> list[Row | Exception]:
        """Send a batch, wait for its rows. A child that died fails this batch and is started again for the
        next one, so a crash in native code costs one batch, not the model."""
        with self._lock:
            if self._conn is None:
                try:
                    self._start()
                except ModelLoadError as exc:
                    self._report(False)
                    raise BatchError(f"{exc}; the batch failed and the next one tries again") from exc
                self._report(True)
            assert self._conn is not None
            try:
                self._conn.send(list(items))
                status, payload = self._conn.recv()
            except (EOFError, OSError, BrokenPipeError) as exc:
                code = self._reap()
                raise BatchError(f"model {self.name}: its model process died (exit code {code}); the batch "
                                 f"failed and the process restarts for the next one") from exc
        if status != "ok":
            raise BatchError(f"model {self.name}: model process error: {payload}")
        return payload

    def _report(self, healthy: bool) -> None:
        if healthy == (not self._failed):
            return  # no change: a working process started again after a crash is not news
        self._failed = not healthy
        if self.on_health is not None:
            self.on_health(healthy)

    def _reap(self) -> int | None:
        process, self._process, self._conn = self._process, None, None
        if process is None:
            return None
        process.join(5)
        if process.is_alive():
            process.kill()
            process.join(5)
        log.error("model_process_died", extra={"fields": {"model": self.name, "exit_code": process.exitcode}})
        if self.on_death is not None:
            self.on_death(process.exitcode)
        return process.exitcode

    def close(self, timeout_s: float = 10.0) -> None:
        """Ask the child to exit (after the batch it is on), then make sure it has."""
        with self._lock:
            process, conn = self._process, self._conn
            self._process = self._conn = None
        if process is None or conn is None:
            return
        try:
            conn.send(None)
        except (OSError, BrokenPipeError):
            pass
        process.join(timeout_s)
        if process.is_alive():
            process.kill()
            process.join(5)
        conn.close()


class ProcessInstances:
    """`--instances N` model processes behind one `run_batch`: each call takes whichever process is free."""

    def __init__(self, processes: Sequence[ModelProcess]) -> None:
        self.processes = list(processes)
        self._free: queue.SimpleQueue[ModelProcess] = queue.SimpleQueue()
        for process in self.processes:
            self._free.put(process)

    def run_batch(self, items: Sequence[Prepared | Raw]) -> list[Row | Exception]:
        process = self._free.get()
        try:
            return process.run_batch(items)
        finally:
            self._free.put(process)

    def close(self) -> None:
        for process in self.processes:
            process.close()


def _child_main(conn: Connection, name: str, folder: str, device: Device, limits: InputLimits,
                intra_op_threads: int, spinning: bool, max_batch_size: int, log_format: str) -> None:
    """The child: load the bundle, say ready, then answer batches until told to stop or the parent goes.

    It ignores SIGINT and SIGTERM, which a terminal or `kill` of the process group also delivers here: the server
    drains its requests first and then closes its model processes; if the server dies, the pipe's end stops this
    loop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    setup_logging(log_format)
    try:
        model = load_model(name, Path(folder), device, limits, intra_op_threads=intra_op_threads,
                           spinning=spinning, max_batch_size=max_batch_size)
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which raises ModelLoadError
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    conn.send(("ready", None))
    while True:
        try:
            items = conn.recv()
        except (EOFError, OSError):  # the server is gone: nothing left to answer
            return
        if items is None:
            return
        try:
            reply = ("ok", model.run_batch(items))
        except Exception as exc:  # noqa: BLE001 - the batch fails, the process goes on
            reply = ("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=3)}")
        conn.send(reply)
