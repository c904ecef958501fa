"""Accuracy of teacher and student on the test split, in every form that gets measured for speed.

ONNX Runtime bundles (fp32, int8, fp16) are scored from raw image bytes through the bundle's own preprocessing,
exactly as the server sees them; the torch models (when a run folder is given) get the same tensors. Retention is
the student's accuracy over the teacher's reference accuracy (torch when available, else the teacher's ONNX fp32
bundle); fidelity is top-1 agreement with that same teacher reference, sample by sample.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.errors import BenchSetupError
from benchmarks.samples import Sample
from export.bundle import Bundle, TextEncoder, preprocess_images

Runner = Callable[[dict[str, np.ndarray]], np.ndarray]  # feeds -> logits (B, C)


def feeds_for(samples: Sequence[Sample], bundle: Bundle) -> dict[str, np.ndarray]:
    spec = bundle.spec.preprocess
    ids, mask = TextEncoder(bundle.tokenizer_path, spec).encode([s.text for s in samples])
    return {"pixel_values": preprocess_images([s.image for s in samples], spec), "input_ids": ids,
            "attention_mask": mask}


def logits_of(run: Runner, samples: Sequence[Sample], bundle: Bundle, batch: int = 64) -> np.ndarray:
    """Logits (N, C) over all samples, in batches."""
    parts = [run(feeds_for(samples[i:i + batch], bundle)) for i in range(0, len(samples), batch)]
    return np.concatenate(parts).astype(np.float32)


def label_indices(samples: Sequence[Sample], labels: Sequence[str]) -> np.ndarray:
    index = {name: i for i, name in enumerate(labels)}
    missing = sorted({s.label for s in samples if s.label not in index})
    if missing:
        raise BenchSetupError(f"test labels {missing[:5]} are not among the model's labels {list(labels)[:8]}…: "
                              "is --data the dataset this model was trained on?")
    return np.asarray([index[s.label] for s in samples], dtype=np.int64)


def ort_runner(bundle: Bundle) -> Runner:
    from benchmarks.latency import ort_session

    session, _ = ort_session(bundle)
    return lambda feeds: session.run(["logits"], feeds)[0]


def torch_model_runner(run_dir: str | Path, which: str) -> Runner:
    from distill.runs import load_model
    from export.api import torch_runner

    model, _ = load_model(run_dir, which)
    return torch_runner(model)


def score(model: str, runtime: str, variant: str, logits: np.ndarray, labels: np.ndarray,
          label_names: Sequence[str], reference: np.ndarray | None, reference_acc: float | None) -> dict[str, Any]:
    """One accuracy row; retention and fidelity are relative to the teacher reference when given."""
    from distill.metrics import classification_metrics, fidelity

    m = classification_metrics(logits, labels, label_names)
    row = {"model": model, "runtime": runtime, "variant": variant, "n": m["n"], "accuracy": m["accuracy"],
           "macro_f1": m["macro_f1"], "auc": m["roc_auc_ovr"], "retention": None, "fidelity": None}
    if reference is not None and reference_acc:
        row["retention"] = m["accuracy"] / reference_acc
        row["fidelity"] = fidelity(logits, reference)["top1_agreement"]
    return row


def evaluate(bundles: Mapping[str, list[Bundle]], samples: Sequence[Sample], run_dir: str | Path | None = None,
             progress: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Accuracy rows for every bundle (keyed by role 'teacher' / 'student') and the run's torch models.

    The teacher goes first so its logits become the reference for retention and fidelity.
    """
    if not samples or any(s.label is None for s in samples):
        raise BenchSetupError("accuracy needs labelled test samples: pass --data with a test split")
    any_bundle = next((b for bs in bundles.values() for b in bs), None)
    if any_bundle is None:
        raise BenchSetupError("accuracy needs at least one bundle")
    names = any_bundle.spec.labels
    labels = label_indices(samples, names)
    jobs: list[tuple[str, str, str, Runner, Bundle]] = []
    for role in ("teacher", "student"):
        if run_dir is not None:
            jobs.append((role, "torch", "fp32", torch_model_runner(run_dir, role), any_bundle))
        for bundle in bundles.get(role, []):
            jobs.append((role, "onnxruntime", bundle.spec.variant, ort_runner(bundle), bundle))
    rows, reference, reference_acc = [], None, None
    for role, runtime, variant, run, bundle in jobs:
        logits = logits_of(run, samples, bundle)
        if role == "teacher" and reference is None:
            reference = logits
            reference_acc = float((logits.argmax(1) == labels).mean())
        rows.append(score(role, runtime, variant, logits, labels, names, reference, reference_acc))
        progress(f"  {role:<8} {runtime:<12} {variant:<5} accuracy {rows[-1]['accuracy']:.4f}  "
                 f"macro-F1 {rows[-1]['macro_f1']:.4f}")
    return rows
