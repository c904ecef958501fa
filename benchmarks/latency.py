"""Model latency in-process: ONNX Runtime per bundle and torch eager for the teacher ("what you had before").

Each cell (model, runtime, variant, batch size) warms up, then times whole calls with a monotonic clock until it
has at least `min_repeats` calls and `min_time_s` seconds (or hits `max_time_s`). It reports p50/p90/p99 of the
per-call latency and the throughput at the median call (samples/s = batch / p50), which is robust to a noisy
neighbour on a shared machine. Inputs are real preprocessed payloads, built once before timing: preprocessing is
not part of model latency (the server benchmark measures it).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.samples import Sample, cycle
from export.bundle import Bundle, TextEncoder, preprocess_images

Feeds = dict[str, np.ndarray]
BATCH_SIZES = (1, 8, 32, 128)


@dataclass(frozen=True)
class TimingPlan:
    """How long to time each cell.

    >>> TimingPlan(warmup=1, min_repeats=3).max_time_s
    20.0
    """

    warmup: int = 3
    min_repeats: int = 10
    min_time_s: float = 1.0
    max_time_s: float = 20.0
    max_repeats: int = 1000

    @classmethod
    def quick(cls) -> "TimingPlan":
        return cls(warmup=2, min_repeats=5, min_time_s=0.3, max_time_s=4.0)


def percentiles(times_ms: Sequence[float]) -> dict[str, float]:
    """p50/p90/p95/p99, mean and min of a list of latencies in milliseconds."""
    arr = np.asarray(times_ms, dtype=np.float64)
    if arr.size == 0:
        return {"p50_ms": float("nan"), "p90_ms": float("nan"), "p95_ms": float("nan"), "p99_ms": float("nan"),
                "mean_ms": float("nan"), "min_ms": float("nan")}
    p50, p90, p95, p99 = np.percentile(arr, [50, 90, 95, 99])
    return {"p50_ms": float(p50), "p90_ms": float(p90), "p95_ms": float(p95), "p99_ms": float(p99),
            "mean_ms": float(arr.mean()), "min_ms": float(arr.min())}


def time_calls(run: Callable[[], Any], plan: TimingPlan) -> list[float]:
    """Warm up, then time `run()` repeatedly; returns per-call milliseconds."""
    for _ in range(plan.warmup):
        run()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < plan.max_repeats:
        t0 = time.perf_counter()
        run()
        times.append((time.perf_counter() - t0) * 1000.0)
        elapsed = time.perf_counter() - start
        if elapsed >= plan.max_time_s or (len(times) >= plan.min_repeats and elapsed >= plan.min_time_s):
            break
    return times


def cell(model: str, runtime: str, variant: str, provider: str, batch: int, times_ms: list[float]) -> dict:
    """One result row."""
    stats = percentiles(times_ms)
    return {"model": model, "runtime": runtime, "variant": variant, "provider": provider, "batch": batch,
            "calls": len(times_ms), **stats, "throughput": batch / (stats["p50_ms"] / 1000.0)}


def bundle_feeds(bundle: Bundle, samples: list[Sample], batch: int) -> Feeds:
    """A batch of real preprocessed inputs for a bundle, built with the bundle's own preprocessing."""
    chosen = cycle(samples, batch)
    spec = bundle.spec.preprocess
    pixel_values = preprocess_images([s.image for s in chosen], spec)  # (B, 3, H, W)
    input_ids, attention_mask = TextEncoder(bundle.tokenizer_path, spec).encode([s.text for s in chosen])
    return {"pixel_values": pixel_values, "input_ids": input_ids, "attention_mask": attention_mask}


def ort_session(bundle: Bundle, device: str = "cpu", threads: int = 0):
    """An ONNX Runtime session with the bundle's recorded options; returns (session, provider actually used)."""
    from export.session import make_session

    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
    session = make_session(bundle.model_path, dict(bundle.spec.session), providers=providers, threads=threads)
    return session, session.get_providers()[0]


def bench_bundle(bundle: Bundle, samples: list[Sample], model: str, batch_sizes: Sequence[int] = BATCH_SIZES,
                 plan: TimingPlan = TimingPlan(), device: str = "cpu", progress: Callable[[str], None] = print
                 ) -> list[dict]:
    """ONNX Runtime latency rows for one bundle at each batch size."""
    session, provider = ort_session(bundle, device)
    rows = []
    for batch in batch_sizes:
        feeds = bundle_feeds(bundle, samples, batch)
        times = time_calls(lambda: session.run(["logits"], feeds), plan)
        rows.append(cell(model, "onnxruntime", bundle.spec.variant, provider, batch, times))
        progress(_line(rows[-1]))
    return rows


def bench_torch(torch_model: Any, bundle: Bundle, samples: list[Sample], model: str,
                batch_sizes: Sequence[int] = BATCH_SIZES, plan: TimingPlan = TimingPlan(),
                progress: Callable[[str], None] = print) -> list[dict]:
    """torch eager latency rows for a model taking (pixel_values, input_ids, attention_mask), on CPU.

    `bundle` supplies the preprocessing so torch sees exactly the tensors ONNX Runtime sees.
    """
    import torch

    torch_model.eval()
    rows = []
    for batch in batch_sizes:
        feeds = {k: torch.from_numpy(v) for k, v in bundle_feeds(bundle, samples, batch).items()}

        def run() -> Any:
            with torch.inference_mode():
                return torch_model(feeds["pixel_values"], feeds["input_ids"], feeds["attention_mask"])

        rows.append(cell(model, "torch-eager", "fp32", "cpu", batch, time_calls(run, plan)))
        progress(_line(rows[-1]))
    return rows


def _line(row: dict) -> str:
    return (f"  {row['model']:<8} {row['runtime']:<12} {row['variant']:<5} batch {row['batch']:>4}: "
            f"p50 {row['p50_ms']:8.2f} ms  p99 {row['p99_ms']:8.2f} ms  {row['throughput']:9.1f} samples/s")


def find(rows: list[dict], **match: Any) -> dict | None:
    """The first row whose fields equal all of `match`."""
    for row in rows:
        if all(row.get(k) == v for k, v in match.items()):
            return row
    return None


def plan_dict(plan: TimingPlan) -> dict:
    return asdict(plan)


def discover_bundles(root: str | Path) -> dict[str, Path]:
    """Bundle folders under `root` (each holds a bundle.json), keyed by folder name; `root` may be one bundle."""
    root = Path(root)
    if (root / "bundle.json").is_file():
        return {root.name: root}
    return {p.name: p for p in sorted(root.iterdir()) if (p / "bundle.json").is_file()}
