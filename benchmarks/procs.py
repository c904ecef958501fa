"""Servers under test as child processes: start, wait until ready, stop by pid, keep the log for error messages.

Every server runs in its own process so that the load generator, the server and the harness never share a GIL.
Ports are picked free by the OS; readiness is a READY line (echo, PyTriton peer) or grpc.health.v1 SERVING
(mmkd-serve), never a fixed sleep.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from benchmarks.errors import ServerStartError

REPO_ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A port the OS says is free now (a small race with other processes is acceptable for benchmarks)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """A child server process with its output going to a log file."""

    def __init__(self, name: str, cmd: Sequence[str], log_dir: Path, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.cmd = list(cmd)
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "w", encoding="utf-8")
        self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT, cwd=REPO_ROOT,
                                     env={**os.environ, **(env or {})}, start_new_session=True)

    @property
    def pid(self) -> int:
        """The server's pid, which is also its process group id (it leads a session of its own)."""
        return self.proc.pid

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def fail(self, why: str) -> ServerStartError:
        self.stop()
        return ServerStartError(f"{self.name}: {why}; command: {' '.join(self.cmd)}\n--- log tail ---\n"
                                f"{self.log_tail()}")

    def wait_for_line(self, prefix: str, timeout_s: float) -> str:
        """Wait until the log has a line starting with `prefix`; return that line."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for line in self.log_tail(1_000_000).splitlines():
                if line.startswith(prefix):
                    return line
            if self.proc.poll() is not None:
                raise self.fail(f"exited with code {self.proc.returncode} before printing {prefix!r}")
            time.sleep(0.05)
        raise self.fail(f"no {prefix!r} line within {timeout_s:.0f} s")

    def wait_for_health(self, address: str, timeout_s: float) -> None:
        """Wait until grpc.health.v1 answers SERVING for the whole server."""
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        deadline = time.monotonic() + timeout_s
        with grpc.insecure_channel(address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise self.fail(f"exited with code {self.proc.returncode} before becoming ready")
                try:
                    reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.1)
        raise self.fail(f"not SERVING on {address} within {timeout_s:.0f} s")

    def stop(self, grace_s: float = 15.0) -> int | None:
        """SIGTERM this process group (the server and any workers it forked), then SIGKILL after the grace."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=5)
            except ProcessLookupError:
                pass
        self._log.close()
        return self.proc.returncode

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_echo(log_dir: Path, num_labels: int, python: str = sys.executable, timeout_s: float = 30.0,
               name: str = "echo") -> tuple[ServerProcess, str]:
    """The echo floor server; returns (process, 'host:port')."""
    proc = ServerProcess(name, [python, "-m", "benchmarks.echo", "--port", "0", "--labels", str(num_labels),
                                "--name", name], log_dir)
    port = int(proc.wait_for_line("READY", timeout_s).split()[1])
    return proc, f"127.0.0.1:{port}"


def start_mmkd_serve(repository: Path, log_dir: Path, name: str, models: Sequence[str] = (),
                     max_batch_size: int = 32, max_queue_delay_ms: float = 2.0, extra: Sequence[str] = (),
                     python: str = sys.executable, timeout_s: float = 120.0) -> tuple[ServerProcess, str]:
    """`mmkd-serve` on a free port, waited for through grpc.health.v1; returns (process, 'host:port')."""
    port = free_port()
    script = Path(python).parent / "mmkd-serve"
    launcher = [str(script)] if script.is_file() else [python, "-m", "server.cli"]
    cmd = [*launcher, "--model-repository", str(repository), "--port", str(port),
           "--max-batch-size", str(max_batch_size), "--max-queue-delay-ms", str(max_queue_delay_ms), *extra]
    for model in models:
        cmd += ["--model", model]
    proc = ServerProcess(name, cmd, log_dir)
    address = f"127.0.0.1:{port}"
    proc.wait_for_health(address, timeout_s)
    return proc, address
