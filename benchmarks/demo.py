"""`make demo`: the main job end to end on the embedded default task, through the same commands a user types.

data -> teacher + student (mmkd-distill) -> ONNX bundles with the parity gate (mmkd-export) -> a quick benchmark
(mmkd-bench) -> mmkd-serve started -> mmkd-predict calls -> a summary table -> the server stopped.

Each stage is skipped when its output already exists, so a second `make demo` redoes nothing it need not.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TypeVar

from benchmarks.procs import start_mmkd_serve

EXPORTS = (("student", "fp32", "student"), ("student", "int8", "student-int8"), ("teacher", "fp32", "teacher"),
           ("teacher", "int8", "teacher-int8"))


@dataclass(frozen=True)
class DemoConfig:
    out: Path
    samples: int = 20000
    config: str = "shapes"
    bench: bool = True


def banner(text: str) -> None:
    print(f"\n\033[1m==> {text}\033[0m", flush=True)


def run(cmd: list[str]) -> None:
    print("$ " + shlex.join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def run_quiet(cmd: list[str]) -> str:
    """Run ``cmd`` capturing its output; print its last line (the result), or everything when it fails."""
    print("$ " + shlex.join(cmd), flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        print(proc.stdout + proc.stderr, flush=True)
        raise subprocess.CalledProcessError(proc.returncode, cmd)
    lines = proc.stdout.strip().splitlines()
    print(lines[-1] if lines else "(no output)", flush=True)
    return proc.stdout


def stage_data(cfg: DemoConfig) -> Path:
    data = cfg.out / "data"
    banner(f"1/5 dataset: {data}")
    if (data / "dataset.json").exists():
        print("exists, skipped")
    else:
        run(["mmkd-distill", "data", "--out", str(data), "--samples", str(cfg.samples)])
    return data


def stage_train(cfg: DemoConfig, data: Path) -> Path:
    run_dir = cfg.out / "run"
    banner(f"2/5 teacher + student distillation: {run_dir}")
    if (run_dir / "metrics.json").exists():
        print("exists, skipped")
    else:
        cmd = ["mmkd-distill", "train", "--config", cfg.config, "--out", str(run_dir), "--data", str(data)]
        run(cmd + (["--resume"] if run_dir.exists() else []))
    return run_dir


def stage_export(cfg: DemoConfig, run_dir: Path, data: Path) -> Path:
    models = cfg.out / "models"
    banner(f"3/5 ONNX bundles with the parity gate: {models}")
    todo = []
    for which, variant, name in EXPORTS:
        target = models / name
        if (target / "bundle.json").exists():
            print(f"{name}: exists, skipped")
            continue
        todo.append(["mmkd-export", "--run", str(run_dir), "--model", which, "--variant", variant, "--name", name,
                     "--data", str(data), "--out", str(target)])
    # Two at a time: an export is mostly one-threaded (tracing, checking, the parity run) and there are two cores
    # here; each prints its summary line (size, parity) when it finishes.
    with ThreadPoolExecutor(max_workers=2) as pool:
        list(pool.map(run_quiet, todo))
    return models


def stage_bench(cfg: DemoConfig, models: Path, run_dir: Path, data: Path) -> Path | None:
    out = cfg.out / "bench"
    banner(f"4/5 quick benchmark: {out}")
    if not cfg.bench:
        print("disabled (--no-bench)")
        return None
    # The PyTriton peer needs its own virtual environment (a large download); `make bench` runs it.
    run(["mmkd-bench", "--quick", "--only", "latency,accuracy,serving", "--bundles", str(models), "--run",
         str(run_dir), "--data", str(data), "--out", str(out)])
    return out


def test_examples(data: Path, count: int) -> list[dict]:
    lines = (data / "test" / "metadata.jsonl").read_text().splitlines()
    step = max(1, len(lines) // count)
    return [json.loads(line) for line in lines[::step][:count]]


def stage_serve(cfg: DemoConfig, models: Path, data: Path) -> list[dict]:
    banner("5/5 serve the bundles and query them over gRPC")
    server, address = start_mmkd_serve(models, cfg.out / "logs", "mmkd-serve")
    print(f"mmkd-serve is SERVING on {address} (log: {server.log_path})", flush=True)
    rows = []
    try:
        for example in test_examples(data, 4):
            for model in ("student", "teacher"):
                cmd = ["mmkd-predict", "--server", address, "--model", model, "--top-k", "1",
                       "--image", str(data / "test" / example["file_name"]), "--text", example["text"]]
                print("$ " + shlex.join(cmd), flush=True)
                reply = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
                rows.append({"model": model, "question": example["text"], "truth": example["label"], **reply})
    finally:
        code = server.stop()
        print(f"mmkd-serve stopped with SIGTERM (exit {code})", flush=True)
    return rows


T = TypeVar("T")


def timed(times: dict[str, float], name: str, fn: Callable[..., T], *args: object) -> T:
    """Run one stage and record its wall time, so the summary shows where the demo's minutes went."""
    start = time.monotonic()
    try:
        return fn(*args)
    finally:
        times[name] = time.monotonic() - start
        print(f"[{name}: {times[name]:.0f} s]", flush=True)


def summary(run_dir: Path, rows: list[dict], bench: Path | None) -> None:
    banner("summary")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    print(json.dumps({k: v for k, v in metrics.items() if k in ("teacher", "student", "summary")}, indent=2)[:4000])
    print(f"\n{'model':8} {'answer':10} {'truth':10} {'p':>6}  question")
    for row in rows:
        label = row.get("label", "?")
        prob = row.get("probability", row.get("top", [{}])[0].get("probability", float("nan")))
        print(f"{row['model']:8} {label:10} {row['truth']:10} {prob:6.3f}  {row['question']}")
    if bench is not None and (bench / "report.md").exists():
        print(f"\nbenchmark report: {bench / 'report.md'}")


def parse_args(argv: list[str] | None) -> DemoConfig:
    p = argparse.ArgumentParser(prog="python -m benchmarks.demo", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="demo-out", type=Path)
    p.add_argument("--samples", type=int, default=DemoConfig.samples)
    p.add_argument("--config", default=DemoConfig.config)
    p.add_argument("--no-bench", dest="bench", action="store_false")
    args = p.parse_args(argv)
    return DemoConfig(out=args.out, samples=args.samples, config=args.config, bench=args.bench)


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    cfg.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    start = time.monotonic()
    times: dict[str, float] = {}
    data = timed(times, "dataset", stage_data, cfg)
    run_dir = timed(times, "distillation", stage_train, cfg, data)
    models = timed(times, "export", stage_export, cfg, run_dir, data)
    bench = timed(times, "benchmark", stage_bench, cfg, models, run_dir, data)
    rows = timed(times, "serve + predict", stage_serve, cfg, models, data)
    summary(run_dir, rows, bench)
    print("\nstage times: " + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()))
    print(f"demo finished in {time.monotonic() - start:.0f} s; outputs in {cfg.out}/", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
