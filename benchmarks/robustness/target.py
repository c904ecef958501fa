"""The server under test: `mmkd-serve` as a child process, its resident memory and its Prometheus metrics."""

from __future__ import annotations

import sys
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from benchmarks.procs import free_port, start_mmkd_serve


class Target:
    """A started server: address, metrics port, process. Use as a context manager (stops the server)."""

    def __init__(self, repository: Path, model: str, log_dir: Path, *, max_batch_size: int = 16,
                 max_queue_delay_ms: float = 2.0, extra: Sequence[str] = ()) -> None:
        self.metrics_port = free_port()
        self.model = model
        self.proc, self.address = start_mmkd_serve(
            repository, log_dir, "mmkd-serve", models=(model,), max_batch_size=max_batch_size,
            max_queue_delay_ms=max_queue_delay_ms,
            extra=["--metrics-port", str(self.metrics_port), "--log-format", "json", *extra])

    @property
    def pid(self) -> int:
        return self.proc.proc.pid

    def alive(self) -> bool:
        return self.proc.proc.poll() is None

    def rss_mb(self) -> float:
        return rss_mb(self.pid)

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        return scrape(f"http://127.0.0.1:{self.metrics_port}/metrics")

    def stop(self) -> int | None:
        return self.proc.stop()

    def __enter__(self) -> "Target":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def rss_mb(pid: int) -> float:
    """Resident set size of a process in MiB, from /proc (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"no VmRSS for pid {pid}")  # pragma: no cover


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a Prometheus endpoint as {(name, sorted labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def metric(samples: dict, name: str, **labels: str) -> float:
    """Sum of the samples called `name` whose labels include `labels`."""
    return sum(v for (n, lbls), v in samples.items()
               if n == name and all(dict(lbls).get(k) == val for k, val in labels.items()))


def build_tiny_repository(root: Path) -> Path:
    """The tiny test bundle (tests/tiny_bundle.py) as a model repository, for validating the harness."""
    tests = Path(__file__).resolve().parents[2] / "tests"
    sys.path.insert(0, str(tests))
    try:
        from tiny_bundle import build_repository
    finally:
        sys.path.remove(str(tests))
    return build_repository(root, ("tiny",))
