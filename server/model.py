"""A served model: its verified bundle, its preprocessing, its ORT runner; and the repository that finds them.

A model repository is a folder of model folders; a model folder's name is the model's name. A model folder is
either a bundle itself (it holds bundle.json) or holds one bundle per variant (`fp32/`, `int8/`, `fp16/`, any
sub-folder with a bundle.json): on a GPU the fp16 variant is preferred, on the CPU fp32, then int8.
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from export.bundle import (SPEC_FILE, Bundle, BundleError, InputError, InputLimits, TextEncoder, check_text,
                           decode_image, image_to_array, load_bundle)

from server.errors import ModelLoadError, ModelNotFoundError
from server.runtime import CPU, Device, OrtRunner

log = logging.getLogger("mmkd.server.model")
GPU_PREFERENCE = ("fp16", "fp32", "int8")
CPU_PREFERENCE = ("fp32", "int8", "fp16")


@dataclass(frozen=True)
class Prepared:
    """One request after preprocessing: pixels (3, H, W) float32 and its unpadded token ids (L,) int64."""

    pixels: np.ndarray
    input_ids: np.ndarray
    preprocess_s: float


@dataclass(frozen=True)
class Raw:
    """One request still to preprocess: prepared by the compute thread as part of its batch."""

    image: bytes
    text: str
    index: int | None = None


@dataclass(frozen=True)
class Row:
    """One request's answer from a batch: its logits (C,) float32, its preprocessing time (wherever that ran)
    and the ONNX Runtime time of the batch it ran in."""

    logits: np.ndarray
    preprocess_s: float
    compute_s: float


class ServedModel:
    """Turns (image bytes, text) into `Prepared` and batches of `Prepared` or `Raw` into `Row`s."""

    def __init__(self, name: str, bundle: Bundle, runner: OrtRunner, limits: InputLimits) -> None:
        self.name = name
        self.bundle = bundle
        self.spec = bundle.spec
        self.runner = runner
        self.limits = limits
        self.encoder = TextEncoder(bundle.tokenizer_path, bundle.spec.preprocess, limits)
        self.ready = False
        self.single_run_s = float("inf")  # median time of a batch of 1, measured at warm-up
        self.sample_compute_s = float("inf")  # per-sample time of a full batch, measured at warm-up
        self.sample_preprocess_s = 0.0  # one request's preprocessing, measured at warm-up

    @property
    def labels(self) -> tuple[str, ...]:
        return self.spec.labels

    @property
    def version(self) -> str:
        return str(self.spec.version)

    @property
    def provider(self) -> str:
        return self.runner.provider

    def prepare(self, image: bytes, text: str, *, index: int | None = None) -> Prepared:
        """Decode and preprocess one request (runs in the preprocessing thread pool); raises InputError."""
        start = time.monotonic()
        suffix = "" if index is None else f"[{index}]"
        img = decode_image(image, self.limits, field="image" + suffix)
        pixels = image_to_array(img, self.spec.preprocess)  # (3, H, W)
        check_text(text, self.limits, field="text" + suffix)  # names the element in multi-element requests
        input_ids, _ = self.encoder.encode([text])  # (1, L)
        return Prepared(pixels, input_ids[0], time.monotonic() - start)

    def collate(self, items: Sequence[Prepared]) -> dict[str, np.ndarray]:
        """Stack pixels and pad token ids to the longest text in this batch."""
        length = max(len(it.input_ids) for it in items)
        input_ids = np.full((len(items), length), self.encoder.pad_id, dtype=np.int64)  # (B, L)
        attention_mask = np.zeros((len(items), length), dtype=np.int64)  # (B, L)
        for row, it in enumerate(items):
            input_ids[row, : len(it.input_ids)] = it.input_ids
            attention_mask[row, : len(it.input_ids)] = 1
        pixels = np.stack([it.pixels for it in items])  # (B, 3, H, W)
        return {"pixel_values": pixels, "input_ids": input_ids, "attention_mask": attention_mask}

    def run_batch(self, items: Sequence[Prepared | Raw]) -> list[Row | InputError]:
        """Prepare the `Raw` items, run ORT once on every item that prepared (executor thread); one `Row` per item,
        or the InputError of an item that did not prepare: a malformed request fails alone, not its batch."""
        out: list[Row | InputError | None] = [None] * len(items)
        ready: list[tuple[int, Prepared]] = []
        for i, item in enumerate(items):
            if isinstance(item, Raw):
                try:
                    item = self.prepare(item.image, item.text, index=item.index)
                except InputError as exc:
                    out[i] = exc
                    continue
            ready.append((i, item))
        if ready:
            start = time.monotonic()
            feeds = self.collate([item for _, item in ready])
            logits = self.runner.run(feeds, outputs=("logits",))["logits"].astype(np.float32)  # (B, C)
            compute = time.monotonic() - start
            for (i, item), row in zip(ready, logits):
                out[i] = Row(row, item.preprocess_s, compute)
        return out  # type: ignore[return-value] - every slot is filled above

    def warm_up(self, max_batch_size: int) -> None:
        """Run a batch of 1 and a full batch at full text length so the first request pays no set-up cost."""
        size = self.spec.preprocess.image_size
        ids = np.full((self.spec.preprocess.max_text_length,), self.encoder.pad_id, dtype=np.int64)
        item = Prepared(np.zeros((3, size, size), np.float32), ids, 0.0)
        for batch in sorted({1, max_batch_size}):
            out = self.run_batch([item] * batch)
            shape = out[0].logits.shape  # type: ignore[union-attr] - a Prepared item cannot fail to prepare
            if len(out) != batch or shape != (len(self.labels),):
                raise ModelLoadError(f"model {self.name}: warm-up gave {len(out)} rows of shape {shape}, "
                                     f"expected {batch} rows of ({len(self.labels)},) — labels and graph disagree")
        self.single_run_s = _median_time(lambda: self.run_batch([item]), repeats=7)
        self.sample_compute_s = _median_time(lambda: self.run_batch([item] * max_batch_size), 3) / max_batch_size
        image, text = _warm_up_request(size)
        self.sample_preprocess_s = _median_time(lambda: self.prepare(image, text), repeats=7)
        self.ready = True

    def preprocess_in_batch(self) -> bool:
        """Whether small requests are best prepared by the compute thread, as part of their batch.

        Whichever thread has time to spare should decode: when a sample's share of a full batch costs less than
        preparing it (a small student), the compute thread idles while the event loop, preparing every request,
        is the bottleneck; when the model costs more (a teacher), the event loop should prepare the next requests
        while ONNX Runtime computes (measured: server/README.md)."""
        return self.sample_compute_s < self.sample_preprocess_s


def _warm_up_request(size: int) -> tuple[bytes, str]:
    """A PNG of noise at the model's input size (pessimistic: noise compresses worst) and a short question."""
    pixels = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue(), "what colour is the circle?"


def _median_time(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def softmax(logits: np.ndarray) -> np.ndarray:
    """Numerically stable softmax over the last axis, computed in float64, returned as float32."""
    z = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


def top_k(probs: np.ndarray, k: int) -> list[int]:
    """Indices of the k largest probabilities, best first (ties by lower index)."""
    order = np.argsort(-probs, kind="stable")
    return [int(i) for i in order[: max(1, min(k, len(probs)))]]


# ------------------------------------------------------------------------------------------------------------------
# The repository
# ------------------------------------------------------------------------------------------------------------------


def discover(repository: Path, names: Sequence[str] = ()) -> dict[str, Path]:
    """Model name -> model folder. Hidden and underscore folders are skipped (temp folders of atomic writes)."""
    if not repository.is_dir():
        raise ModelLoadError(f"model repository {repository} is not a folder")
    found = {p.name: p for p in sorted(repository.iterdir())
             if p.is_dir() and not p.name.startswith((".", "_")) and _bundle_dirs(p)}
    if names:
        missing = [n for n in names if n not in found]
        if missing:
            raise ModelLoadError(f"--model {missing} not found in {repository}; it holds {sorted(found)}")
        found = {n: found[n] for n in names}
    if not found:
        raise ModelLoadError(f"model repository {repository} holds no bundles (folders with {SPEC_FILE})")
    return found


def _bundle_dirs(folder: Path) -> list[Path]:
    if (folder / SPEC_FILE).is_file():
        return [folder]
    return [p for p in sorted(folder.iterdir()) if p.is_dir() and (p / SPEC_FILE).is_file()]


def load_model(name: str, folder: Path, device: Device, limits: InputLimits, *, intra_op_threads: int = 0,
               spinning: bool = True, max_batch_size: int = 1) -> ServedModel:
    """Load the best variant for the device, verify it, build its session and warm it up."""
    try:
        bundles = {b.spec.variant: b for b in (load_bundle(p) for p in _bundle_dirs(folder))}
    except BundleError as exc:
        raise ModelLoadError(f"model {name}: {exc}") from exc
    gpu_possible = device.wants_gpu and _cuda_listed()
    variant = _choose(bundles, GPU_PREFERENCE if gpu_possible else CPU_PREFERENCE)
    runner = _runner(bundles[variant], device, intra_op_threads, spinning)
    if gpu_possible and runner.provider == CPU:
        log.warning("cuda_fallback", extra={"fields": {
            "model": name, "reason": "CUDAExecutionProvider is listed but the session got the CPU provider "
                                    "(CUDA/cuDNN libraries or a GPU missing)"}})
    if runner.provider == CPU and variant != _choose(bundles, CPU_PREFERENCE):
        variant = _choose(bundles, CPU_PREFERENCE)  # CUDA was listed but the session fell back: use the CPU pick
        runner = _runner(bundles[variant], device, intra_op_threads, spinning)
    model = ServedModel(name, bundles[variant], runner, limits)
    model.warm_up(max_batch_size)
    return model


def _runner(bundle: Bundle, device: Device, intra_op_threads: int, spinning: bool) -> OrtRunner:
    """The session with the optimisation level the bundle's parity check ran with (bundle.json "session")."""
    level = str(bundle.spec.session.get("graph_optimization_level", "ORT_ENABLE_ALL"))
    return OrtRunner(bundle.model_path, device, intra_op_threads=intra_op_threads, spinning=spinning,
                     graph_optimization_level=level)


def _choose(bundles: dict[str, Bundle], preference: Sequence[str]) -> str:
    for variant in preference:
        if variant in bundles:
            return variant
    raise ModelLoadError(f"no usable variant among {sorted(bundles)}")  # pragma: no cover - VARIANTS is closed


def _cuda_listed() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


class ModelRegistry:
    """The served models by name."""

    def __init__(self, models: dict[str, ServedModel]) -> None:
        self._models = dict(models)

    def get(self, name: str) -> ServedModel:
        try:
            return self._models[name]
        except KeyError:
            raise ModelNotFoundError(name, list(self._models)) from None

    def add(self, model: ServedModel) -> None:
        self._models[model.name] = model

    def names(self) -> list[str]:
        return sorted(self._models)

    def __iter__(self):
        return iter(self._models[n] for n in self.names())

    def __len__(self) -> int:
        return len(self._models)

    def __contains__(self, name: object) -> bool:
        return name in self._models
