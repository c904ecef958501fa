"""Serving benchmarks: `mmkd-serve` (batching on and off), the echo floor and the PyTriton peer, all driven by
the same load generator process with the same payloads.

Each server runs alone while it is measured (two cores here: a second server would steal the first's CPU).
Open-loop rates, when not given, are fixed fractions of the closed-loop saturation throughput measured just before
for the same server, so they sit where latency is interesting on any machine.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from benchmarks.loadgen import LoadPlan, spawn
from benchmarks.procs import start_echo, start_mmkd_serve


@dataclass(frozen=True)
class ServingPlan:
    """Load shape and server knobs shared by every serving measurement.

    >>> ServingPlan.quick().concurrency
    (1, 8, 32)
    """

    concurrency: tuple[int, ...] = (1, 8, 32, 128)
    rates: tuple[float, ...] = ()  # empty: derived from saturation with rate_fractions
    rate_fractions: tuple[float, ...] = (0.5, 0.9)
    duration_s: float = 5.0
    warmup_s: float = 1.0
    max_batch_size: int = 32
    max_queue_delay_ms: float = 2.0
    server_args: tuple[str, ...] = ()
    channels: int = 1  # connections per load run, every target alike; with --server-arg=--workers=N

    @classmethod
    def quick(cls) -> "ServingPlan":
        return cls(concurrency=(1, 8, 32), rate_fractions=(0.7,), duration_s=2.0, warmup_s=0.5)

    def load(self, targets: Sequence[str], model: str, api: str = "mmkd", server_groups: Sequence[int] = ()
             ) -> LoadPlan:
        return LoadPlan(targets=tuple(targets), model=model, api=api, concurrency=self.concurrency, rates=(),
                        duration_s=self.duration_s, warmup_s=self.warmup_s, server_groups=tuple(server_groups),
                        channels=self.channels)


def drive(load: LoadPlan, payloads: Path, plan: ServingPlan, labels: dict) -> list[dict]:
    """Closed loop at every concurrency, then open loop at fixed rates; rows carry `labels`."""
    rows = spawn(load, payloads)
    rates = plan.rates or _derived_rates(rows, plan.rate_fractions)
    if rates:
        rows += spawn(replace(load, concurrency=(), rates=rates), payloads)
    return [{**labels, "api": load.api, **row} for row in rows]


def _derived_rates(rows: list[dict], fractions: Sequence[float]) -> tuple[float, ...]:
    peak = max((r["throughput"] for r in rows if r.get("shape") == "closed"), default=0.0)
    return tuple(round(peak * f, 1) for f in fractions if peak * f >= 1.0)


def bench_echo(payloads: Path, num_labels: int, plan: ServingPlan, log_dir: Path) -> list[dict]:
    """The gRPC floor: the bare echo server under the closed-loop shape only (it has no latency to speak of)."""
    proc, address = start_echo(log_dir, num_labels)
    try:
        rows = spawn(plan.load([address], "echo", server_groups=[proc.pid]), payloads)
    finally:
        proc.stop()
    return [{"target": "echo", "model": "echo", "variant": "", "batching": "", "api": "mmkd", **r} for r in rows]


def bench_model(repository: Path, bundle_name: str, role: str, variant: str, payloads: Path, plan: ServingPlan,
                log_dir: Path, batching: bool, kserve: bool = False, progress: Callable[[str], None] = print
                ) -> list[dict]:
    """One model through `mmkd-serve`, dynamic batching on (plan.max_batch_size) or off (--max-batch-size 1)."""
    max_batch = plan.max_batch_size if batching else 1
    name = f"serve-{bundle_name}-{'on' if batching else 'off'}"
    proc, address = start_mmkd_serve(repository, log_dir, name, models=[bundle_name], max_batch_size=max_batch,
                                     max_queue_delay_ms=plan.max_queue_delay_ms, extra=plan.server_args)
    labels = {"target": "mmkd-serve", "model": role, "bundle": bundle_name, "variant": variant,
              "batching": "on" if batching else "off", "max_batch_size": max_batch}
    try:
        rows = drive(plan.load([address], bundle_name, server_groups=[proc.pid]), payloads, plan, labels)
        if kserve:
            kplan = replace(plan, rates=(), rate_fractions=())
            rows += drive(kplan.load([address], bundle_name, api="kserve", server_groups=[proc.pid]), payloads,
                          kplan, labels)
    finally:
        code = proc.stop()
    if code not in (0, None):
        progress(f"  warning: {name} exited with code {code} (log: {proc.log_path})")
    for row in rows:
        progress(_line(row))
    return rows


def _line(row: dict) -> str:
    where = f"c={row['concurrency']}" if row.get("shape") == "closed" else f"rate={row.get('rate')}/s"
    return (f"  {row['target']:<10} {row['model']:<8} {row.get('variant', ''):<5} batching {row.get('batching', ''):<3}"
            f" {row['api']:<6} {where:<12} {row['throughput']:9.1f} req/s  p50 {row['p50_ms']:8.2f}  "
            f"p99 {row['p99_ms']:8.2f} ms  errors {row['error_count']}")
