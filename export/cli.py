"""`mmkd-export`: a thin argparse layer over `export.api.export_bundle`.

    mmkd-export --run RUN --model student --out models/student [--variant int8] [--opset 20]

Exit status: 0 bundle written; 1 the parity gate failed (the message says what diverged and by how much,
the full report is written beside --out); 2 any other export failure (bad run folder, checker, contract).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmkd-export", description="Export a run's model as a gated ONNX model bundle.")
    p.add_argument("--run", required=True, help="run folder written by `mmkd-distill train`")
    p.add_argument("--model", required=True, choices=("student", "teacher"), help="which model of the run")
    p.add_argument("--out", required=True, help="bundle folder to write (e.g. models/student)")
    p.add_argument("--variant", default="fp32", choices=("fp32", "int8", "fp16"))
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's, 20 with torch 2.13)")
    p.add_argument("--name", default=None, help="bundle/model name (default: student, student-int8, ...)")
    p.add_argument("--data", default=None, help="dataset folder (default: RUN/data or the run config's)")
    p.add_argument("--samples", type=int, default=512, help="test samples for the parity gate (default 512; >= 256 to pass)")
    p.add_argument("--calibration-samples", type=int, default=0,
                   help="int8 only: quantize convolutions statically, calibrated on this many training samples")
    p.add_argument("--per-channel", action="store_true", help="int8 only: per-channel weight scales (default per-tensor)")
    p.add_argument("--force", action="store_true", help="replace an existing bundle at --out")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from export.api import export_bundle  # heavy (torch): after argument errors have been reported
    from export.bundle import BundleError, load_bundle
    from export.errors import ExportError, ParityError

    try:
        path = export_bundle(args.run, args.model, args.out, variant=args.variant, opset=args.opset,
                             name=args.name, data_root=args.data, num_samples=args.samples,
                             calibration_samples=args.calibration_samples, per_channel=args.per_channel,
                             overwrite=args.force)
    except ParityError as exc:
        print(f"mmkd-export: {exc}", file=sys.stderr)
        return 1
    except (ExportError, BundleError, OSError) as exc:
        print(f"mmkd-export: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # distill's errors (missing run, bad checkpoint) have their own tree
        if type(exc).__module__.startswith("distill"):
            print(f"mmkd-export: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 2
        raise
    spec = load_bundle(path).spec
    parity = spec.provenance["parity"][spec.variant]
    print(json.dumps({"bundle": str(path), "name": spec.name, "variant": spec.variant,
                      "size_bytes": spec.provenance["size_bytes"], "parity": parity}, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
