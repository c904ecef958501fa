"""`mmkd-distill data`: generate the embedded shapes-VQA dataset."""

from __future__ import annotations

import argparse

from distill.data.generate import SplitSizes, generate_dataset


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="dataset folder to create (written atomically)")
    parser.add_argument("--samples", type=int, default=20000, help="train questions N (default 20000)")
    parser.add_argument("--seed", type=int, default=0, help="generator seed; same seed, same bytes (default 0)")
    parser.add_argument("--validation", type=int, default=None, help="validation questions (default N/10)")
    parser.add_argument("--test", type=int, default=None, help="test questions (default N/10)")
    parser.add_argument("--transfer", type=int, default=None, help="unlabelled transfer questions (default 2N)")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: CPU count)")
    parser.add_argument("--force", action="store_true", help="regenerate / replace whatever is at --out")


def run(args: argparse.Namespace) -> int:
    sizes = SplitSizes.for_samples(args.samples, args.validation, args.test, args.transfer)
    result = generate_dataset(args.out, sizes, args.seed, workers=args.workers, force=args.force)
    counts = ", ".join(f"{split} {spec['samples']}" for split, spec in result.info["splits"].items())
    if result.written:
        print(f"wrote {result.path} in {result.seconds:.1f}s: {counts}; {len(result.info['labels'])} labels")
    else:
        print(f"{result.path} is up to date (seed {result.info['seed']}: {counts}); nothing written, --force regenerates")
    return 0
