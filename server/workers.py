"""`mmkd-serve --workers N`: N server processes behind one port.

Why: one Python process serialises its event loop, preprocessing and gRPC's poller behind the interpreter lock and
keeps about 1.2 cores busy however many the machine has (measured in server/README.md). N worker processes bind
the same port with SO_REUSEPORT and the kernel spreads *connections* (not requests) across them: many clients, or
clients with several connections, use every worker; a single connection stays on one. Each worker loads its own
copy of the models and answers health, metrics (`--metrics-port P` gives worker i port P + i) and both APIs.

The supervisor forwards SIGTERM/SIGINT to every worker and waits for them to drain. When a worker dies on its own
it stops the others and exits 1, so that the orchestrator restarts the whole set rather than leaving it serving
at part capacity without anyone noticing.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import signal
import socket
import subprocess
import sys
import time
from types import FrameType

from server.errors import ConfigError
from server.logs import fields
from server.settings import ServerSettings

log = logging.getLogger("mmkd.server.workers")
POLL_S = 0.2
KILL_AFTER_S = 5.0  # beyond the drain grace, before a worker that does not stop is killed


def claim_port(host: str, port: int) -> int:
    """The port the workers will share: `port` itself after checking nothing holds it, or a free one for 0.

    The probe binds without SO_REUSEPORT, so it also fails when another server (ours or not) already listens
    there with SO_REUSEPORT: the workers must not silently join a stranger's port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise ConfigError(f"cannot bind {host}:{port} ({exc.strerror}); is another server using the port?") from exc
        return int(probe.getsockname()[1])


def worker_settings(settings: ServerSettings, port: int, index: int) -> ServerSettings:
    """One worker's settings: the shared port with SO_REUSEPORT, its own metrics port."""
    metrics = settings.metrics_port
    if metrics:  # 0 (each picks a free port, logged) and None (off) stay as they are
        metrics += index
    return dataclasses.replace(settings, workers=1, reuse_port=True, port=port, metrics_port=metrics)


def supervise(settings: ServerSettings) -> int:
    """Start the workers, wait for a signal or a worker's death; returns the exit code."""
    port = claim_port(settings.host, settings.port)
    last_metrics = (settings.metrics_port or 0) + settings.workers - 1
    if settings.metrics_port and last_metrics > 65535:
        raise ConfigError(f"metrics ports {settings.metrics_port}..{last_metrics} run past 65535")
    workers = [_spawn(worker_settings(settings, port, i)) for i in range(settings.workers)]
    log.info("workers_started", extra=fields(port=port, pids=[w.pid for w in workers]))
    stopping = False

    def forward(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        for worker in workers:
            if worker.poll() is None:
                worker.send_signal(signal.SIGTERM)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    while not stopping:
        dead = [w for w in workers if w.poll() is not None]
        if dead:
            log.error("worker_exited", extra=fields(pid=dead[0].pid, code=dead[0].returncode,
                                                    action="stopping the other workers; restart the server"))
            forward(signal.SIGTERM, None)
            _wait_all(workers, settings.grace_s + KILL_AFTER_S)
            return 1
        time.sleep(POLL_S)
    codes = _wait_all(workers, settings.grace_s + KILL_AFTER_S)
    log.info("workers_stopped", extra=fields(codes=codes))
    return 0 if all(code == 0 for code in codes) else 1


def _spawn(settings: ServerSettings) -> subprocess.Popen:
    """A worker is this module run with its settings as JSON: no command line to re-parse or re-derive."""
    return subprocess.Popen([sys.executable, "-m", "server.workers", json.dumps(settings.to_dict())])


def _wait_all(workers: list[subprocess.Popen], timeout_s: float) -> list[int]:
    deadline = time.monotonic() + timeout_s
    for worker in workers:
        try:
            worker.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
    return [worker.returncode for worker in workers]


def run_worker(settings_json: str) -> int:
    from server.cli import run  # the single-process server; imported here because cli imports this module

    return run(ServerSettings(**json.loads(settings_json)))


if __name__ == "__main__":
    sys.exit(run_worker(sys.argv[1]))
