"""`mmkd-bench`: teacher vs student on latency, accuracy and serving, written up as results.json + report.md + PNGs.

    mmkd-bench --bundles bundles --data runs/default/data --run runs/default --out bench-results
    mmkd-bench --bundles bundles --out demo-out/bench --quick            # what `make demo` runs (a minute or two)
    mmkd-bench --bundles bundles --out out --only latency,serving        # some sections only

`--bundles` is a folder of bundles (the server's model repository) or one bundle. A bundle's role (teacher or
student) comes from its provenance (`which`, written by mmkd-export) or else from its folder name. `--run` (the
training run folder, default: the one recorded in the bundles' provenance) adds torch eager for the teacher and
torch rows to the accuracy table; `--data` is the dataset folder (default: RUN/data when it exists; synthetic
payloads otherwise, and then no accuracy section).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.errors import BenchError, BenchSetupError, PeerUnavailable
from benchmarks.latency import BATCH_SIZES, TimingPlan, bench_bundle, bench_torch, discover_bundles
from benchmarks.loadgen import write_payloads
from benchmarks.machine import describe_machine
from benchmarks.report import write_report
from benchmarks.samples import get_samples
from benchmarks.serving import ServingPlan, bench_echo, bench_model
from export.bundle import Bundle, load_bundle

SECTIONS = ("latency", "accuracy", "serving", "peer")


def role_of(bundle: Bundle) -> str | None:
    """'teacher' or 'student' from provenance, else from the folder name; None for anything else."""
    which = bundle.spec.provenance.get("which")
    if which in ("teacher", "student"):
        return which
    name = bundle.path.name.lower()
    return next((r for r in ("teacher", "student") if r in name), None)


def load_bundles(root: Path) -> dict[str, list[Bundle]]:
    """Bundles by role, fp32 first (it is the reference variant)."""
    found = discover_bundles(root) if root.exists() else {}
    if not found:
        raise BenchSetupError(f"no bundles under {root}: export some with `mmkd-export --run RUN --model student "
                              f"--out {root}/student` (and the teacher), or pass --bundles DIR")
    by_role: dict[str, list[Bundle]] = {}
    for path in found.values():
        bundle = load_bundle(path)
        role = role_of(bundle)
        if role:
            by_role.setdefault(role, []).append(bundle)
    for bundles in by_role.values():
        bundles.sort(key=lambda b: (b.spec.variant != "fp32", b.spec.variant, b.path.name))
    return by_role


def resolve_run(args: argparse.Namespace, bundles: dict[str, list[Bundle]]) -> Path | None:
    if args.run:
        return Path(args.run)
    for bundle in bundles.get("teacher", []) + bundles.get("student", []):
        run = bundle.spec.provenance.get("run")
        if run and (Path(run) / "teacher").is_dir():
            return Path(run)
    return None


def resolve_data(args: argparse.Namespace, run: Path | None) -> Path | None:
    if args.data:
        return Path(args.data)
    if run and (run / "data").is_dir():
        return run / "data"
    return None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="mmkd-bench", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--bundles", default="bundles", help="folder of bundles (model repository) or one bundle")
    p.add_argument("--data", default=None, help="dataset folder (imagefolder layout with a test split)")
    p.add_argument("--run", default=None, help="training run folder (torch eager teacher, torch accuracy)")
    p.add_argument("--out", default="bench-results", help="output folder for results.json, report.md, PNGs")
    p.add_argument("--quick", action="store_true", help="short timings and fewer load levels (make demo)")
    p.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="ONNX Runtime device (default: auto)")
    p.add_argument("--batch-sizes", default=None, help="in-process batch sizes (default 1,8,32,128)")
    p.add_argument("--concurrency", default=None, help="closed-loop concurrency levels (default 1,8,32,128)")
    p.add_argument("--duration", type=float, default=None, help="seconds measured per load level")
    p.add_argument("--accuracy-samples", type=int, default=None, help="test samples scored (default: all; quick 512)")
    p.add_argument("--no-torch", action="store_true", help="skip torch eager rows even when a run is found")
    p.add_argument("--server-arg", action="append", default=[],
                   help="extra mmkd-serve flag for every served run, e.g. --server-arg=--intra-op-threads=1 "
                        "(repeatable)")
    p.add_argument("--channels", type=int, default=None,
                   help="connections each load run opens, for every target alike (echo and PyTriton included; "
                        "default 1); use with --server-arg=--workers=N, since the kernel spreads connections")
    args = p.parse_args(argv)
    args.sections = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(args.sections) - set(SECTIONS))
    if unknown:
        p.error(f"--only: unknown sections {unknown}; choose from {list(SECTIONS)}")
    return args


def run(args: argparse.Namespace) -> dict:
    say = lambda line: print(line, flush=True)  # noqa: E731 - progress stays visible under make
    machine = describe_machine()
    device = args.device or machine.device
    bundles = load_bundles(Path(args.bundles))
    run_dir = None if args.no_torch else resolve_run(args, bundles)
    data = resolve_data(args, run_dir)
    reference = (bundles.get("student") or bundles.get("teacher"))[0]
    samples = get_samples(data, 256, reference.spec.preprocess.image_size)
    timing = TimingPlan.quick() if args.quick else TimingPlan()
    serving = ServingPlan.quick() if args.quick else ServingPlan()
    if args.concurrency:
        serving = ServingPlan(**{**serving.__dict__, "concurrency": tuple(int(x) for x in args.concurrency.split(","))})
    if args.duration:
        serving = ServingPlan(**{**serving.__dict__, "duration_s": args.duration})
    if args.server_arg:
        serving = ServingPlan(**{**serving.__dict__, "server_args": tuple(args.server_arg)})
    if args.channels:
        serving = ServingPlan(**{**serving.__dict__, "channels": args.channels})
    batch_sizes = tuple(int(x) for x in args.batch_sizes.split(",")) if args.batch_sizes else BATCH_SIZES
    results: dict = {"machine": machine.to_dict(), "latency": [], "accuracy": [], "serving": [], "notes": [],
                     "settings": {"quick": args.quick, "sections": args.sections, "device": device,
                                  "bundles": {r: [b.path.name for b in bs] for r, bs in bundles.items()},
                                  "run": str(run_dir) if run_dir else None, "data": str(data) if data else None,
                                  "timing": timing.__dict__, "serving": serving.__dict__}}
    say(f"mmkd-bench on {machine.label()}")
    started = time.monotonic()
    if "latency" in args.sections:
        say("== model latency (in-process)")
        for role in ("teacher", "student"):
            for bundle in bundles.get(role, []):
                if bundle.spec.variant == "fp16" and device != "cuda":
                    results["notes"].append(f"{bundle.path.name}: fp16 is measured on CUDA only (no GPU here)")
                    continue
                results["latency"] += bench_bundle(bundle, samples, role, batch_sizes, timing, device, say)
        if run_dir and bundles.get("teacher"):
            from distill.runs import load_model

            model, _ = load_model(run_dir, "teacher")
            results["latency"] += bench_torch(model, bundles["teacher"][0], samples, "teacher", batch_sizes,
                                              timing, say)
        elif bundles.get("teacher"):
            results["notes"].append("torch eager teacher not measured: no run folder (--run)")
    if "accuracy" in args.sections:
        say("== accuracy (test split)")
        if data is None:
            results["notes"].append("accuracy not measured: no dataset folder (--data or a run with data/)")
        else:
            from benchmarks.accuracy import evaluate

            n = args.accuracy_samples or (512 if args.quick else None)
            test = get_samples(data, n or 10**9, split="test")
            results["accuracy"] = evaluate(bundles, test, run_dir, say)
    with tempfile.TemporaryDirectory() as tmp:
        payloads = write_payloads(samples, Path(tmp) / "payloads.jsonl")
        logs = Path(args.out) / "logs"
        if "serving" in args.sections:
            say("== serving (load generator in its own process)")
            results["serving"] += bench_echo(payloads, reference.spec.num_labels, serving, logs)
            repo = Path(args.bundles)
            for role in ("student", "teacher"):
                fp32 = [b for b in bundles.get(role, []) if b.spec.variant == "fp32"]
                if not fp32 or fp32[0].path.parent.resolve() != repo.resolve():
                    continue
                for batching in (True, False):
                    results["serving"] += bench_model(repo, fp32[0].path.name, role, "fp32", payloads, serving,
                                                      logs, batching, kserve=(role == "student" and batching),
                                                      progress=say)
        if "peer" in args.sections and bundles.get("student"):
            say("== peer: PyTriton serving the same student")
            try:
                from benchmarks.pytriton_peer import bench_peer

                student = next(b for b in bundles["student"] if b.spec.variant == "fp32")
                results["serving"] += bench_peer(student, payloads, serving, logs, say)
            except (PeerUnavailable, StopIteration, ImportError) as exc:
                results["notes"].append(f"PyTriton peer not measured: {exc}")
                say(f"  PyTriton peer not measured: {str(exc)[:300]}")
    results["settings"]["elapsed_s"] = round(time.monotonic() - started, 1)
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        results = run(args)
    except BenchError as exc:
        print(f"mmkd-bench: {exc}", file=sys.stderr)
        return 2
    written = write_report(results, args.out)
    from benchmarks.report import acceptance

    print("== acceptance")
    for goal in acceptance(results):
        print(f"  {goal['status']:<4} {goal['goal']}: {goal['measured']}")
    print("wrote " + ", ".join(str(p) for p in written.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
