"""The parity gate: the exported graph must answer like the torch model on real samples.

Real samples means raw image bytes and text from the run's test split, pushed through the bundle's own
preprocessing (`export.bundle.preprocess_images`, `TextEncoder`) — the code the server runs — then into
both torch and ONNX Runtime. Batches cycle through several sizes (1, an odd one, a large one) and every
third batch is padded to the spec's maximum text length (others get 0-3 extra pad tokens, as a server
batch that holds a longer text would add), so the batch and sequence axes are exercised at many values: a graph whose sequence length was baked in at export fails here, at the first other length.

Bounds (GateThresholds):
- fp32: top-1 agreement 100% and max |logit diff| <= max(1e-4, 1e-5 * max|logit|). The relative term
  only matters for logits above 10: float32 carries ~7 significant digits and a few hundred
  accumulations cost about two, so 1e-5 of the logit scale is the honest float32 floor.
- int8: accuracy on the labelled samples within 1 point of the fp32 model's; without labels, top-1
  agreement with torch >= 99%.
- fp16: top-1 agreement >= 99.5%.
Any ONNX Runtime error or non-finite output fails the gate whatever the variant, including in the
length sweep (a few samples cut to every length 1..max_text_length).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from export.bundle import InputLimits, PreprocessSpec, TextEncoder, preprocess_images

Feeds = dict[str, np.ndarray]
Runner = Callable[[Feeds], np.ndarray]  # feeds -> logits (B, C)

DEFAULT_BATCH_SIZES: tuple[int, ...] = (1, 7, 64)


@dataclass(frozen=True)
class Sample:
    """One raw test example: encoded image bytes, text, and the label index when known."""

    image: bytes
    text: str
    label: int | None = None


@dataclass(frozen=True)
class GateThresholds:
    """Pass bounds per variant; see the module docstring for why these numbers."""

    min_samples: int = 256
    fp32_atol: float = 1e-4
    fp32_scale_rtol: float = 1e-5
    fp32_min_agreement: float = 1.0
    int8_max_accuracy_drop: float = 0.01
    int8_min_agreement_unlabelled: float = 0.99
    fp16_min_agreement: float = 0.995


@dataclass
class _Tally:
    """Running comparison state across batches."""

    n: int = 0
    agree: int = 0
    correct_ref: int = 0
    correct_onnx: int = 0
    labelled: int = 0
    max_abs: float = 0.0
    sum_abs: float = 0.0
    scale: float = 0.0
    worst: dict[str, Any] = field(default_factory=dict)
    lengths: set[int] = field(default_factory=set)
    sizes: set[int] = field(default_factory=set)
    errors: list[str] = field(default_factory=list)
    failed_samples: int = 0
    nonfinite: int = 0


def plan_batches(n: int, batch_sizes: Sequence[int]) -> list[tuple[int, int]]:
    """(start, stop) slices that cycle through `batch_sizes` until n samples are covered."""
    if not batch_sizes or min(batch_sizes) < 1:
        raise ValueError(f"batch sizes must be positive, got {list(batch_sizes)}")
    out, start, i = [], 0, 0
    while start < n:
        stop = min(n, start + batch_sizes[i % len(batch_sizes)])
        out.append((start, stop))
        start, i = stop, i + 1
    return out


def make_feeds(batch: Sequence[Sample], spec: PreprocessSpec, encoder: TextEncoder,
               pad_to: int | None = None) -> Feeds:
    """Raw samples -> the three graph inputs, through the bundle's preprocessing."""
    limits = InputLimits()
    pixels = preprocess_images([s.image for s in batch], spec, limits)  # (B, 3, H, W)
    input_ids, attention_mask = encoder.encode([s.text for s in batch], pad_to=pad_to)  # (B, L)
    return {"pixel_values": pixels, "input_ids": input_ids, "attention_mask": attention_mask}


def _compare(t: _Tally, ref: np.ndarray, got: np.ndarray, labels: list[int | None], where: dict) -> None:
    """Fold one batch's reference and ONNX logits into the tally."""
    ref, got = np.asarray(ref, np.float64), np.asarray(got, np.float64)
    if ref.shape != got.shape:
        t.errors.append(f"{_where(where)}: logits shape {got.shape}, torch gives {ref.shape}")
        t.failed_samples += len(labels)
        return
    t.nonfinite += int((~np.isfinite(got)).any(axis=1).sum())
    diff = np.abs(ref - got)  # (B, C)
    diff = np.where(np.isfinite(diff), diff, np.inf)
    row = int(diff.max(axis=1).argmax())
    if diff.max() > t.max_abs or not t.worst:
        t.max_abs = float(diff.max())
        t.worst = {**where, "row": row, "sample": where["start"] + row}
    t.sum_abs += float(diff.mean(axis=1).sum())
    t.scale = max(t.scale, float(np.abs(ref).max()))
    ref_top, got_top = ref.argmax(axis=1), got.argmax(axis=1)
    t.n += len(ref)
    t.agree += int((ref_top == got_top).sum())
    for label, r, g in zip(labels, ref_top, got_top):
        if label is not None:
            t.labelled += 1
            t.correct_ref += int(r == label)
            t.correct_onnx += int(g == label)


def _where(w: Mapping[str, Any]) -> str:
    if isinstance(w.get("batch"), str):
        return f"{w['batch']} (batch size {w['size']})"
    return f"batch {w['batch']} (samples {w['start']}..{w['stop'] - 1}, batch size {w['size']}, L={w['length']})"


def _run_batch(t: _Tally, reference: Runner, onnx: Runner, feeds: Feeds, labels: list[int | None],
               where: dict[str, Any]) -> None:
    t.lengths.add(where["length"])
    t.sizes.add(where["size"])
    ref = reference(feeds)
    try:
        got = onnx(feeds)
    except Exception as exc:  # ORT raises its own Fail/InvalidArgument types
        t.failed_samples += len(labels)
        if len(t.errors) < 5:
            t.errors.append(f"{_where(where)}: ONNX Runtime failed: {str(exc).strip()[:400]}")
        return
    _compare(t, ref, got, labels, where)


def length_sweep(reference: Runner, onnx: Runner, samples: Sequence[Sample], spec: PreprocessSpec,
                 encoder: TextEncoder, rows: int = 3) -> dict[str, Any]:
    """The first `rows` samples at every sequence length 1..max_text_length (texts cut to L tokens).

    Real texts cluster at a few lengths; this sweep makes sure every length the server can send runs,
    which is what exposes a graph with a baked-in sequence axis whatever the test texts look like.
    """
    t = _Tally()
    full = make_feeds(samples[:rows], spec, encoder, pad_to=spec.max_text_length)
    for length in range(1, spec.max_text_length + 1):
        feeds = {**full, "input_ids": full["input_ids"][:, :length].copy(),
                 "attention_mask": full["attention_mask"][:, :length].copy()}
        feeds["attention_mask"][:, 0] = 1  # keep at least one real token per row
        where = {"batch": f"sweep L={length}", "start": 0, "stop": len(feeds["input_ids"]),
                 "size": len(feeds["input_ids"]), "length": length}
        _run_batch(t, reference, onnx, feeds, [None] * where["size"], where)
    return _summary(t, where["size"])


def compare(reference: Runner, onnx: Runner, samples: Sequence[Sample], spec: PreprocessSpec,
            encoder: TextEncoder, batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES) -> dict[str, Any]:
    """Run every sample through both runners, then the length sweep; return the raw measurements
    (no pass/fail yet)."""
    t = _Tally()
    for b, (start, stop) in enumerate(plan_batches(len(samples), batch_sizes)):
        batch = samples[start:stop]
        feeds = make_feeds(batch, spec, encoder)
        natural = feeds["input_ids"].shape[1]
        pad_to = spec.max_text_length if b % 3 == 2 else min(spec.max_text_length, natural + b % 4)
        if pad_to > natural:  # extra padding, as a server batch holding a longer text would add
            feeds = make_feeds(batch, spec, encoder, pad_to=pad_to)
        where = {"batch": b, "start": start, "stop": stop, "size": stop - start,
                 "length": int(feeds["input_ids"].shape[1])}
        _run_batch(t, reference, onnx, feeds, [s.label for s in batch], where)
    summary = _summary(t, len(samples))
    if samples:
        summary["length_sweep"] = length_sweep(reference, onnx, samples, spec, encoder)
    return summary


def _summary(t: _Tally, total: int) -> dict[str, Any]:
    n = max(t.n, 1)
    acc = None
    if t.labelled:
        acc = {"reference": t.correct_ref / t.labelled, "onnx": t.correct_onnx / t.labelled, "labelled": t.labelled}
    return {
        "samples": total,
        "compared": t.n,
        "failed_samples": t.failed_samples,
        "errors": t.errors,
        "nonfinite_rows": t.nonfinite,
        "batch_sizes": sorted(t.sizes),
        "sequence_lengths": sorted(t.lengths),
        "max_abs_diff": t.max_abs if t.n else None,
        "mean_abs_diff": t.sum_abs / n if t.n else None,
        "logit_scale": t.scale,
        "worst": t.worst,
        "top1_agreement": t.agree / n if t.n else 0.0,
        "disagreements": t.n - t.agree,
        "accuracy": acc,
    }


def gate(measured: Mapping[str, Any], variant: str, th: GateThresholds = GateThresholds(),
         fp32_accuracy: float | None = None) -> list[str]:
    """Every way `measured` misses the bounds for `variant`, as messages that say by how much.

    `fp32_accuracy` is the fp32 model's accuracy on the same samples (the int8 reference); it
    defaults to the torch reference's accuracy, which the fp32 graph matches by its own gate.
    """
    fails = list(measured["errors"])
    if measured["failed_samples"]:
        fails.append(f"{measured['failed_samples']} of {measured['samples']} samples could not run in ONNX Runtime")
    if measured["samples"] < th.min_samples:
        fails.append(f"only {measured['samples']} samples; the gate needs at least {th.min_samples}")
    if measured["nonfinite_rows"]:
        fails.append(f"{measured['nonfinite_rows']} samples produced NaN/inf logits in ONNX Runtime")
    if not measured["compared"]:
        return fails
    sweep = measured.get("length_sweep")
    if sweep:
        fails += [f"length sweep: {e}" for e in sweep["errors"]]
        if sweep["nonfinite_rows"]:
            fails.append(f"length sweep: {sweep['nonfinite_rows']} rows produced NaN/inf logits")
        if variant == "fp32" and sweep["compared"]:
            fails += [f"length sweep: {f}" for f in _fp32_fails(sweep, th)]
    agreement = measured["top1_agreement"]
    if variant == "fp32":
        fails += _fp32_fails(measured, th)
    elif variant == "int8":
        fails += _int8_fails(measured, th, fp32_accuracy)
    elif variant == "fp16" and agreement < th.fp16_min_agreement:
        fails.append(_agreement_msg(measured, th.fp16_min_agreement))
    return fails


def fp32_bound(measured: Mapping[str, Any], th: GateThresholds) -> float:
    return max(th.fp32_atol, th.fp32_scale_rtol * measured["logit_scale"])


def _fp32_fails(m: Mapping[str, Any], th: GateThresholds) -> list[str]:
    fails = []
    if m["top1_agreement"] < th.fp32_min_agreement:
        fails.append(_agreement_msg(m, th.fp32_min_agreement))
    bound = fp32_bound(m, th)
    if not m["max_abs_diff"] <= bound:
        w = m["worst"]
        fails.append(f"max |logit diff| {m['max_abs_diff']:.3g} > bound {bound:.3g} (logit scale "
                     f"{m['logit_scale']:.3g}); worst at sample {w.get('sample')}, {_where(w)}")
    return fails


def _int8_fails(m: Mapping[str, Any], th: GateThresholds, fp32_accuracy: float | None) -> list[str]:
    acc = m["accuracy"]
    if acc is None:
        if m["top1_agreement"] < th.int8_min_agreement_unlabelled:
            return [_agreement_msg(m, th.int8_min_agreement_unlabelled) + " (no labels: agreement stands in for accuracy)"]
        return []
    ref = acc["reference"] if fp32_accuracy is None else fp32_accuracy
    drop = ref - acc["onnx"]
    if drop > th.int8_max_accuracy_drop + 1e-12:
        return [f"int8 accuracy {acc['onnx']:.2%} is {drop * 100:.2f} points below fp32's {ref:.2%} "
                f"(allowed: {th.int8_max_accuracy_drop * 100:.2f})"]
    return []


def _agreement_msg(m: Mapping[str, Any], need: float) -> str:
    return (f"top-1 agreement with torch {m['top1_agreement']:.2%} < {need:.2%} "
            f"({m['disagreements']} of {m['compared']} samples changed class)")


def median_latency_ms(run: Runner, feeds: Feeds, repeats: int = 10, warmup: int = 2) -> float:
    """Median wall time of one call, after warm-up (monotonic clock)."""
    for _ in range(warmup):
        run(feeds)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run(feeds)
        times.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(times))


def thresholds_dict(th: GateThresholds) -> dict[str, Any]:
    return asdict(th)
