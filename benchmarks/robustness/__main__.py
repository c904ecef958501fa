"""`python -m benchmarks.robustness {fuzz,overload,soak}`: start mmkd-serve on a model repository, run, report.

    python -m benchmarks.robustness fuzz --tiny --requests 10000
    python -m benchmarks.robustness overload --model-repository runs/bundles --model student --duration 60
    python -m benchmarks.robustness soak --model-repository runs/bundles --model student --duration 600

`--tiny` builds the tiny test bundle in a temporary folder (to check the harness itself). Overload and soak send
from `--workers` processes (default: one per core) so that the client can really offer 2x capacity. Results go to
`--out` (default runs/robustness) as JSON and markdown; the exit code is 1 when a check failed.
"""

from __future__ import annotations

import argparse
import asyncio
import shlex
import sys
import tempfile
from pathlib import Path

from benchmarks.machine import describe_machine
from benchmarks.robustness import report
from benchmarks.robustness.fuzz import run_fuzz
from benchmarks.robustness.overload import run_overload, run_soak
from benchmarks.robustness.target import Target, build_tiny_repository
from benchmarks.robustness.workers import default_workers


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.robustness", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="kind", required=True)
    for kind in ("fuzz", "overload", "soak"):
        p = sub.add_parser(kind)
        where = p.add_mutually_exclusive_group(required=True)
        where.add_argument("--model-repository", type=Path, help="folder of bundles to serve")
        where.add_argument("--tiny", action="store_true", help="serve the tiny test bundle (harness check)")
        p.add_argument("--model", default="tiny", help="model to serve and send to (default tiny)")
        p.add_argument("--out", type=Path, default=Path("runs/robustness"))
        p.add_argument("--server-arg", action="append", default=[],
                       help="extra mmkd-serve flag, repeatable (e.g. --server-arg=--max-queue-size=64)")
        p.add_argument("--max-batch-size", type=int, default=16)
        p.add_argument("--seed", type=int, default=0)
        if kind == "fuzz":
            p.add_argument("--requests", type=int, default=13_500,
                           help="generated cases, plus the crafted corpus (13,500: over 10,000 malformed in all)")
            p.add_argument("--concurrency", type=int, default=8)
        else:
            p.add_argument("--duration", type=float, default=60.0 if kind == "overload" else 600.0,
                           help="seconds of load (acceptance: overload 60, soak 600)")
            p.add_argument("--capacity-s", type=float, default=5.0, help="seconds to measure capacity")
            p.add_argument("--capacity-rps", type=float, help="skip the measurement and use this capacity")
            p.add_argument("--workers", type=int, default=default_workers(),
                           help="load-generating processes (default: one per core, 2..16)")
            p.add_argument("--image-size", type=int, default=32,
                           help="side of the valid requests' images in px (over 64: JPEG photos, whose decoding "
                                "makes the server, not the client, the bottleneck on a small machine)")
        if kind == "overload":
            p.add_argument("--factor", type=float, default=2.0)
            p.add_argument("--recovery", type=float, default=10.0)
            p.add_argument("--timeout", type=float, default=2.0, help="client deadline per request (s)")
        if kind == "soak":
            p.add_argument("--fraction", type=float, default=0.7)
            p.add_argument("--invalid-ratio", type=float, default=0.1)
    return parser


def run(args: argparse.Namespace, target: Target) -> dict:
    """Overload and soak block on their worker processes; only the fuzzer runs in this process's event loop."""
    if args.kind == "overload":
        return run_overload(target.address, args.model, read_rss=target.rss_mb, read_metrics=target.metrics,
                            workers=args.workers, duration_s=args.duration, factor=args.factor,
                            recovery_s=args.recovery, capacity_s=args.capacity_s, timeout_s=args.timeout,
                            capacity_rps=args.capacity_rps, seed=args.seed, image_size=args.image_size)
    if args.kind == "soak":
        return run_soak(target.address, args.model, read_rss=target.rss_mb, workers=args.workers,
                        duration_s=args.duration, fraction=args.fraction, invalid_ratio=args.invalid_ratio,
                        capacity_s=args.capacity_s, capacity_rps=args.capacity_rps, seed=args.seed,
                        image_size=args.image_size)
    return asyncio.run(run_fuzz_with_memory(args, target))


async def run_fuzz_with_memory(args: argparse.Namespace, target: Target) -> dict:
    before = target.rss_mb()
    result = await run_fuzz(target.address, args.model, requests=args.requests, seed=args.seed,
                            concurrency=args.concurrency, alive=target.alive,
                            progress=lambda n: print(f"  {n} requests", file=sys.stderr, flush=True))
    after = target.rss_mb() if target.alive() else None
    return {**result.to_dict(), "rss_before_mb": before, "rss_after_mb": after}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="mmkd-robust-") as tmp:
        repo = build_tiny_repository(Path(tmp) / "repo") if args.tiny else args.model_repository
        print(f"starting mmkd-serve on {repo} (model {args.model})", file=sys.stderr)
        with Target(repo, args.model, args.out / "logs", max_batch_size=args.max_batch_size,
                    extra=args.server_arg) as target:
            result = run(args, target)
    result["command"] = "python -m benchmarks.robustness " + shlex.join(argv if argv is not None else sys.argv[1:])
    json_path, md_path = report.save(args.out, args.kind, result, describe_machine())
    print(report.markdown(args.kind, {**result, "machine": describe_machine().label()}))
    print(f"wrote {json_path} and {md_path}", file=sys.stderr)
    return 0 if result.get("passed") else 1


if __name__ == "__main__":
    sys.exit(main())
