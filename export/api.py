"""One library function per job: `export_bundle` (a run's model -> a gated bundle) and `bundle_model`
(any module with the mmkd forward -> a gated bundle). The CLI is a thin argparse layer over the first.

Order, each step failing with a narrow error (export.errors):
export (torch.onnx dynamo) -> onnx.checker full check -> names, dtypes, shapes -> [int8/fp16 variant,
checked the same way] -> parity gate on real test samples (values) -> bundle written atomically through
`export.bundle.write_bundle`. A failed gate writes nothing servable: the report goes to
`<out>.parity-failed.json` beside the target so the miss can be inspected.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from export.bundle import BundleSpec, PreprocessSpec, TextEncoder, write_bundle
from export.errors import ExportError, ParityError
from export.onnx_export import check_onnx, export_onnx, graph_axes, validate_graph
from export.parity import (DEFAULT_BATCH_SIZES, GateThresholds, Runner, Sample, compare, fp32_bound, gate,
                           make_feeds, median_latency_ms, plan_batches, thresholds_dict)
from export.samples import load_run_samples
from export.session import logits_runner, make_session, session_config
from export.variants import convert_fp16, quantize_int8

VARIANTS = ("fp32", "int8", "fp16")
EXPORTER = "torch.onnx.export(dynamo=True, external_data=False)"


def torch_runner(model: nn.Module) -> Runner:
    """feeds (numpy) -> logits (numpy) through the torch model, eval mode, no grad."""
    model = model.eval()

    @torch.no_grad()
    def run(feeds: Mapping[str, np.ndarray]) -> np.ndarray:
        out = model(*(torch.from_numpy(feeds[k]) for k in ("pixel_values", "input_ids", "attention_mask")))
        logits = out if isinstance(out, torch.Tensor) else (out["logits"] if isinstance(out, Mapping) else out.logits)
        return logits.float().numpy()

    return run


def _checked(path: Path, spec: PreprocessSpec, num_labels: int, names: Sequence[str]) -> onnx.ModelProto:
    model = check_onnx(path)
    validate_graph(model, image_size=spec.image_size, num_labels=num_labels, output_names=names)
    return model


def _make_variant(variant: str, fp32: Path, out: Path, spec: PreprocessSpec, encoder: TextEncoder,
                  calibration: Sequence[Sample] | None, per_channel: bool = False) -> dict[str, Any]:
    if variant == "fp16":
        return convert_fp16(fp32, out)
    batches = None
    if calibration:
        batches = [make_feeds(calibration[a:b], spec, encoder) for a, b in plan_batches(len(calibration), [32])]
    return quantize_int8(fp32, out, calibration=batches, per_channel=per_channel)


def _speed(paths: Mapping[str, Path], samples: Sequence[Sample], spec: PreprocessSpec, encoder: TextEncoder,
           batch_sizes: Sequence[int], configs: Mapping[str, dict]) -> dict[str, Any]:
    """Median CPU latency (ms) per model file at the smallest and largest parity batch sizes."""
    out: dict[str, Any] = {}
    for size in sorted({min(len(samples), b) for b in (min(batch_sizes), max(batch_sizes))}):
        feeds = make_feeds(samples[:size], spec, encoder)
        for key, path in paths.items():
            session = make_session(path, configs[key], providers=["CPUExecutionProvider"])
            out.setdefault(f"batch_{size}", {})[key] = round(median_latency_ms(logits_runner(session), feeds), 4)
    return out


def _run_gate(ref: Runner, path: Path, variant: str, samples: Sequence[Sample], spec: PreprocessSpec,
              encoder: TextEncoder, batch_sizes: Sequence[int], th: GateThresholds,
              fp32_acc: float | None = None) -> tuple[dict[str, Any], list[str]]:
    """Measure `path` against torch with the bundle's own session options; (measurements, failures)."""
    config = session_config(variant)
    session = make_session(path, config)
    measured = compare(ref, logits_runner(session), samples, spec, encoder, batch_sizes)
    measured["provider"] = session.get_providers()[0]
    fails = gate(measured, variant, th, fp32_accuracy=fp32_acc)
    if variant == "fp32":
        measured["bound"] = fp32_bound(measured, th)
    measured["passed"] = not fails
    return measured, [f"{variant}: {f}" for f in fails]


def bundle_model(model: nn.Module, out_dir: str | os.PathLike[str], *, name: str, labels: Sequence[str],
                 spec: PreprocessSpec, tokenizer: str | os.PathLike[str], samples: Sequence[Sample],
                 variant: str = "fp32", opset: int | None = None, version: int = 1,
                 vocab_size: int | None = None, provenance: Mapping[str, Any] | None = None,
                 calibration: Sequence[Sample] | None = None, per_channel: bool = False,
                 batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
                 thresholds: GateThresholds = GateThresholds(), overwrite: bool = False) -> Path:
    """Export `model`, check it, gate it on `samples`, and write a bundle at `out_dir`; return its path.

    Raises ExportCheckError / ExportValidationError / VariantError / ParityError (export.errors);
    nothing is written at `out_dir` unless every check passed.
    """
    if variant not in VARIANTS:
        raise ExportError(f"variant must be one of {VARIANTS}, got {variant!r}")
    out_dir = Path(out_dir)
    encoder = TextEncoder(tokenizer, spec)
    ref = torch_runner(model)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".export-", dir=out_dir.parent) as tmp:
        fp32 = Path(tmp) / "fp32.onnx"
        names = export_onnx(model, fp32, image_size=spec.image_size, vocab_size=vocab_size or encoder.vocab_size,
                            opset=opset)
        graph = _checked(fp32, spec, len(labels), names)
        results, fails = {}, []
        results["fp32"], f = _run_gate(ref, fp32, "fp32", samples, spec, encoder, batch_sizes, thresholds)
        fails += f
        final, recipe = fp32, {"method": "none"}
        if variant != "fp32":
            final = Path(tmp) / f"{variant}.onnx"
            recipe = _make_variant(variant, fp32, final, spec, encoder, calibration, per_channel)
            _checked(final, spec, len(labels), names)
            acc = results["fp32"]["accuracy"]
            results[variant], f = _run_gate(ref, final, variant, samples, spec, encoder, batch_sizes, thresholds,
                                            fp32_acc=acc["onnx"] if acc else None)
            fails += f
        paths = {"fp32": fp32, **({variant: final} if variant != "fp32" else {})}
        sizes = {k: p.stat().st_size for k, p in paths.items()}
        speed = _speed(paths, samples, spec, encoder, batch_sizes, {k: session_config(k) for k in paths})
        report = {"variant": variant, "passed": not fails, "failures": fails, "thresholds": thresholds_dict(thresholds),
                  "results": results, "size_bytes": sizes, "latency_ms_cpu": speed}
        report_bytes = (json.dumps(report, indent=2, sort_keys=True, default=_jsonable) + "\n").encode()
        if fails:
            failed = out_dir.parent / f"{out_dir.name}.parity-failed.json"
            _atomic_write(failed, report_bytes)
            raise ParityError(fails + [f"full report: {failed}"], report)
        prov = {**(provenance or {}), "exporter": EXPORTER, "torch": torch.__version__, "onnx": onnx.__version__,
                "opset": _opset(graph), "axes": graph_axes(graph), "variant_recipe": recipe,
                "size_bytes": sizes, "latency_ms_cpu": speed,
                "parity": {k: _parity_brief(v) for k, v in results.items()}}
        bundle = BundleSpec(name=name, labels=tuple(labels), preprocess=spec, version=version, variant=variant,
                            outputs=tuple(names), provenance=prov, session=session_config(variant))
        files = {"model.onnx": final, "tokenizer.json": Path(tokenizer), "parity.json": report_bytes}
        return write_bundle(out_dir, bundle, files, overwrite=overwrite)


def _parity_brief(measured: Mapping[str, Any]) -> dict[str, Any]:
    keys = ("samples", "top1_agreement", "max_abs_diff", "accuracy", "provider", "passed")
    return {k: measured.get(k) for k in keys}


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def _jsonable(value: Any) -> Any:
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


def export_bundle(run_dir: str | os.PathLike[str], which: str, out_dir: str | os.PathLike[str],
                  variant: str = "fp32", opset: int | None = None, *, name: str | None = None,
                  data_root: str | os.PathLike[str] | None = None, num_samples: int = 512,
                  calibration_samples: int = 0, per_channel: bool = False,
                  batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
                  thresholds: GateThresholds = GateThresholds(), overwrite: bool = False) -> Path:
    """Bundle RUN/<which> (student or teacher) as `variant`, gated on the run's test split.

    `name` defaults to `which` for fp32 and `<which>-<variant>` otherwise, so all variants can share one
    model repository. `num_samples` defaults to 512 although the gate needs 256: "int8 within 1 point"
    is a difference of ~3 samples at 256, inside the noise; 512 halves the flips needed to matter. `calibration_samples` > 0 quantizes the convolutions statically (int8 only),
    calibrated on that many training-split samples.
    """
    from distill.runs import load_model

    model, info = load_model(run_dir, which)
    spec = PreprocessSpec.from_dict(info["preprocess"])
    labels = list(info["labels"])
    samples = load_run_samples(run_dir, info, "test", num_samples, labels, data_root)
    calibration = None
    if variant == "int8" and calibration_samples:
        calibration = load_run_samples(run_dir, info, "train", calibration_samples, labels, data_root)
    config = info.get("config") or {}
    provenance = {"run": str(Path(run_dir).resolve()), "which": which, "model_name": info.get("model_name"),
                  "model_kwargs": info.get("model_kwargs"), "config_hash": info.get("config_hash") or _hash(config),
                  "metrics": info.get("metrics", {})}
    return bundle_model(model, out_dir, name=name or (which if variant == "fp32" else f"{which}-{variant}"),
                        labels=labels, spec=spec, tokenizer=info["tokenizer"], samples=samples, variant=variant,
                        opset=opset, vocab_size=(info.get("model_kwargs") or {}).get("vocab_size"),
                        provenance=provenance, calibration=calibration, per_channel=per_channel,
                        batch_sizes=batch_sizes,
                        thresholds=thresholds, overwrite=overwrite)


def _hash(config: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]
