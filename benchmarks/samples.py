"""Request payloads for every benchmark: (image bytes, text, label) triples.

All harnesses (in-process latency, the load generator, the echo floor, the PyTriton peer) send the same payloads,
so their numbers compare like with like. They come from a dataset folder in the Hugging Face `imagefolder` layout
(`<data>/<split>/metadata.jsonl` with `file_name`, a text field and a label field), or, with no folder, from
synthetic images and template questions so the harness runs anywhere.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks.errors import BenchSetupError

TEXT_KEYS = ("text", "question")
LABEL_KEYS = ("label", "answer")
SYNTHETIC_QUESTIONS = (
    "what colour is the triangle?", "how many circles are there?", "is there a red square?",
    "what shape is the blue object?", "is the red circle left of the blue cross?",
)


@dataclass(frozen=True)
class Sample:
    """One request payload; `label` is None for synthetic samples."""

    image: bytes
    text: str
    label: str | None = None


def synthetic_samples(n: int, image_size: int = 64, seed: int = 0) -> list[Sample]:
    """n random PNG images with template questions: realistic payload sizes, no dataset needed."""
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(n):
        pixels = rng.integers(0, 256, size=(image_size, image_size, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels, "RGB").save(buf, format="PNG")
        samples.append(Sample(buf.getvalue(), SYNTHETIC_QUESTIONS[i % len(SYNTHETIC_QUESTIONS)]))
    return samples


def _metadata_file(data_dir: Path, split: str) -> Path:
    for candidate in (data_dir / split / "metadata.jsonl", data_dir / "metadata.jsonl"):
        if candidate.is_file():
            return candidate
    raise BenchSetupError(f"no metadata.jsonl for split {split!r} under {data_dir} (looked in {data_dir / split} "
                          f"and {data_dir}); pass the dataset folder written by `mmkd-distill` or a user dataset")


def _field(row: dict, keys: tuple[str, ...], where: str) -> str:
    for key in keys:
        if key in row:
            return str(row[key])
    raise BenchSetupError(f"{where}: a row has none of the fields {keys}; found {sorted(row)}")


def load_samples(data_dir: str | Path, split: str = "test", limit: int | None = None) -> list[Sample]:
    """The first `limit` samples of a split, in file order (deterministic)."""
    data_dir = Path(data_dir)
    meta = _metadata_file(data_dir, split)
    samples = []
    with open(meta, encoding="utf-8") as fh:
        for line in fh:
            if not line.strip():
                continue
            row = json.loads(line)
            if meta.parent == data_dir and row.get("split", split) != split:
                continue
            image_path = meta.parent / _field(row, ("file_name",), str(meta))
            samples.append(Sample(image_path.read_bytes(), _field(row, TEXT_KEYS, str(meta)),
                                  _field(row, LABEL_KEYS, str(meta))))
            if limit is not None and len(samples) >= limit:
                break
    if not samples:
        raise BenchSetupError(f"{meta}: no samples for split {split!r}")
    return samples


def get_samples(data_dir: str | Path | None, n: int, image_size: int = 64, split: str = "test") -> list[Sample]:
    """Dataset samples when a folder is given, synthetic ones otherwise."""
    if data_dir is None:
        return synthetic_samples(n, image_size)
    return load_samples(data_dir, split, limit=n)


def cycle(samples: list[Sample], n: int) -> list[Sample]:
    """n samples, repeating the list as needed (batches larger than the sample pool)."""
    if not samples:
        raise BenchSetupError("no samples to build a batch from")
    return [samples[i % len(samples)] for i in range(n)]
