"""Read a dataset folder in the Hugging Face `imagefolder` layout: the embedded dataset's and a user's own.

::

    ROOT/dataset.json              optional: {"labels": [...]} fixes the label order (else: sorted train labels)
    ROOT/tokenizer.json            optional: else training builds one from the train texts
    ROOT/<split>/metadata.jsonl    one JSON object per line: file_name, text, label (+ extra fields, e.g. qtype)
    ROOT/<split>/metadata.csv      ... or the same columns as CSV with a header row (one of the two, not both)
    ROOT/<split>/<file_name>       the images (PNG, JPEG or WebP), file_name relative to the split folder

Every problem raises a `DatasetError` subclass whose message starts with `path:line:` so the user can open
the file at the row at fault. Images are turned into arrays with `export.bundle.decode_image` and
`image_to_array`, the code the server runs, so training sees exactly the tensors serving sees.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from distill.data.parallel import map_in_processes
from distill.data.tokenizer import DEFAULT_VOCAB_SIZE, build_tokenizer, load_tokenizer
from distill.errors import (
    DatasetFormatError,
    EmptySplitError,
    LabelError,
    MissingImageError,
    UnreadableImageError,
)
from export.bundle import InputError, InputLimits, PreprocessSpec, TextEncoder, check_text, decode_image, image_to_array

DATASET_FILE = "dataset.json"
TOKENIZER_FILE = "tokenizer.json"
METADATA_NAMES = ("metadata.jsonl", "metadata.csv")
CACHE_DIR = ".cache"
CACHE_FORMAT = 1
DECODE_CHUNK = 1000
PARALLEL_MIN = 4000  # below this many images, starting worker processes costs more than it saves
# Image decoding errors come from PIL and bundle.decode_image; reading from the OS.
_IMAGE_ERRORS = (InputError, OSError, ValueError)


@dataclass(frozen=True)
class Example:
    """One row of a split. `label` is None in unlabelled splits; `line` is the row's line in the metadata file."""

    file_name: str
    path: Path
    text: str
    label: str | None
    qtype: str | None = None
    line: int = 0
    source: Path | None = field(default=None, compare=False, repr=False)

    def where(self) -> str:
        """'metadata file:line' for error messages."""
        return f"{self.source}:{self.line}" if self.source else str(self.path)


@dataclass
class EncodedSplit:
    """A split as model-ready arrays; row i of every array is example i."""

    pixel_values: np.ndarray  # float32 (N, 3, H, W), normalised as the bundle's PreprocessSpec says
    input_ids: np.ndarray  # int64 (N, L), L = spec.max_text_length, padded with the tokenizer's [PAD]
    attention_mask: np.ndarray  # int64 (N, L)
    labels: np.ndarray  # int64 (N,), index into the label list; -1 where unlabelled
    qtypes: list[str | None]
    texts: list[str]
    file_names: list[str]

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, indices: Sequence[int] | np.ndarray) -> "EncodedSplit":
        """The rows at `indices` (e.g. the labelled few of the few-labels regime), as a new EncodedSplit."""
        idx = np.asarray(indices, dtype=np.int64)
        return EncodedSplit(
            pixel_values=self.pixel_values[idx],
            input_ids=self.input_ids[idx],
            attention_mask=self.attention_mask[idx],
            labels=self.labels[idx],
            qtypes=[self.qtypes[i] for i in idx.tolist()],
            texts=[self.texts[i] for i in idx.tolist()],
            file_names=[self.file_names[i] for i in idx.tolist()],
        )


# ----------------------------------------------------------------------------------------------------------------
# Labels and rows
# ----------------------------------------------------------------------------------------------------------------


def read_labels(root: str | os.PathLike[str]) -> list[str]:
    """The label list in its fixed order: dataset.json's `labels` if present, else the sorted train labels."""
    root = Path(root)
    info_path = root / DATASET_FILE
    if info_path.is_file():
        labels = read_dataset_info(root).get("labels")
        if labels is not None:
            if not isinstance(labels, list) or not labels or not all(isinstance(x, str) and x for x in labels):
                raise DatasetFormatError("'labels' must be a non-empty list of non-empty strings", path=info_path)
            if len(set(labels)) != len(labels):
                raise DatasetFormatError("'labels' has duplicates", path=info_path)
            return list(labels)
    found = sorted({ex.label for ex in read_split(root, "train") if ex.label is not None})
    return found


def read_dataset_info(root: str | os.PathLike[str]) -> dict[str, Any]:
    """dataset.json as a dict ({} when absent)."""
    path = Path(root) / DATASET_FILE
    if not path.is_file():
        return {}
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DatasetFormatError(f"bad JSON: {exc.msg} (column {exc.colno})", path=path, line=exc.lineno) from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetFormatError(f"cannot read: {exc}", path=path) from exc
    if not isinstance(info, dict):
        raise DatasetFormatError(f"expected a JSON object, got {type(info).__name__}", path=path)
    return info


def dataset_tokenizer(root: str | os.PathLike[str], vocab_size: int = DEFAULT_VOCAB_SIZE) -> tuple[Tokenizer, bool]:
    """ROOT/tokenizer.json if the dataset has one, else one built from the train texts; True when built.

    Saving a built tokenizer is the caller's job (into the run folder, so a user's dataset stays untouched).
    """
    path = Path(root) / TOKENIZER_FILE
    if path.is_file():
        try:
            return load_tokenizer(path), False
        except ValueError as exc:
            raise DatasetFormatError(f"not a tokenizers file ({exc})", path=path) from exc
    return build_tokenizer([ex.text for ex in read_split(root, "train", require_labels=False)], vocab_size), True


def find_metadata(root: str | os.PathLike[str], split: str) -> Path:
    """The split's metadata.jsonl or metadata.csv; a missing split or metadata file is an EmptySplitError."""
    split_dir = Path(root) / split
    if not split_dir.is_dir():
        raise EmptySplitError(
            f"split folder {split!r} is missing (found {_split_names(Path(root)) or 'no split folders'}); expected "
            f"{split_dir} holding images and a metadata.jsonl",
            path=split_dir,
        )
    found = [split_dir / name for name in METADATA_NAMES if (split_dir / name).is_file()]
    if not found:
        raise EmptySplitError("no metadata.jsonl or metadata.csv in this split folder", path=split_dir)
    if len(found) > 1:
        raise DatasetFormatError("has both metadata.jsonl and metadata.csv; keep exactly one", path=split_dir)
    return found[0]


def _split_names(root: Path) -> list[str]:
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def read_split(
    root: str | os.PathLike[str],
    split: str,
    labels: Sequence[str] | None = None,
    require_labels: bool = True,
) -> list[Example]:
    """Read and check every row of a split.

    Checks, each failure naming the metadata file and line: the JSON/CSV parses, `file_name` and `text` are
    present, the image file exists inside the split folder, a label is present (when `require_labels`) and is
    one of `labels` (when given). Unlabelled splits (e.g. `transfer/`) are read with `require_labels=False`.
    """
    meta = find_metadata(root, split)
    split_dir = meta.parent
    known = set(labels) if labels is not None else None
    listing = set(os.listdir(split_dir))
    examples = []
    for line, row in _rows(meta):
        example = _example(row, meta, line, split_dir, listing)
        _check_label(example, known, require_labels, split)
        examples.append(example)
    if not examples:
        raise EmptySplitError(f"the {split!r} split has no rows", path=meta)
    return examples


def _rows(meta: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    if meta.suffix == ".csv":
        yield from _csv_rows(meta)
    else:
        yield from _jsonl_rows(meta)


def _jsonl_rows(meta: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    try:
        with open(meta, encoding="utf-8") as fh:
            for line, text in enumerate(fh, start=1):
                if not text.strip():
                    continue
                try:
                    row = json.loads(text)
                except json.JSONDecodeError as exc:
                    raise DatasetFormatError(f"bad JSON: {exc.msg} (column {exc.colno})", path=meta, line=line) from exc
                if not isinstance(row, dict):
                    raise DatasetFormatError(
                        f"expected a JSON object per line, got {type(row).__name__}", path=meta, line=line
                    )
                yield line, row
    except UnicodeDecodeError as exc:
        raise DatasetFormatError(f"not UTF-8 text ({exc.reason} at byte {exc.start})", path=meta) from exc


def _csv_rows(meta: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    try:
        with open(meta, encoding="utf-8", newline="") as fh:
            reader = csv.DictReader(fh)
            columns = reader.fieldnames or []
            missing = [c for c in ("file_name", "text") if c not in columns]
            if missing:
                raise DatasetFormatError(
                    f"the header must name the columns file_name, text (and label); missing {missing}, found {columns}",
                    path=meta,
                    line=1,
                )
            for row in reader:
                line = reader.line_num
                if None in row:
                    raise DatasetFormatError(
                        f"{len(row[None])} more field(s) than the header's {len(columns)} columns (quote commas in text)",
                        path=meta,
                        line=line,
                    )
                if any(value is None for value in row.values()):
                    raise DatasetFormatError(
                        f"fewer fields than the header's {len(columns)} columns {columns}", path=meta, line=line
                    )
                yield line, row
    except csv.Error as exc:
        raise DatasetFormatError(f"bad CSV: {exc}", path=meta, line=getattr(exc, "line_num", 0)) from exc
    except UnicodeDecodeError as exc:
        raise DatasetFormatError(f"not UTF-8 text ({exc.reason} at byte {exc.start})", path=meta) from exc


def _example(row: dict[str, Any], meta: Path, line: int, split_dir: Path, listing: set[str]) -> Example:
    file_name = row.get("file_name")
    if not isinstance(file_name, str) or not file_name.strip():
        raise DatasetFormatError("'file_name' is missing or empty", path=meta, line=line)
    relative = Path(file_name)
    if relative.is_absolute() or ".." in relative.parts:
        raise DatasetFormatError(
            f"file_name {file_name!r} must be a path relative to {split_dir} that stays inside it", path=meta, line=line
        )
    path = split_dir / relative
    if file_name not in listing and not path.is_file():
        raise MissingImageError(f"image {file_name!r} not found (looked for {path})", path=meta, line=line)
    text = row.get("text")
    if not isinstance(text, str) or not text.strip():
        raise DatasetFormatError("'text' is missing or empty; every row needs a question", path=meta, line=line)
    qtype = row.get("qtype")
    return Example(
        file_name=file_name,
        path=path,
        text=text,
        label=_label_value(row.get("label"), meta, line),
        qtype=qtype if isinstance(qtype, str) and qtype else None,
        line=line,
        source=meta,
    )


def _label_value(value: Any, meta: Path, line: int) -> str | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise DatasetFormatError(
            f"'label' must be a string (the class name), got {type(value).__name__} {value!r}", path=meta, line=line
        )
    return str(value).strip()


def _check_label(example: Example, known: set[str] | None, require_labels: bool, split: str) -> None:
    if example.label is None:
        if require_labels:
            raise LabelError(
                f"no 'label' for {example.file_name!r}; every row of the {split!r} split needs one "
                "(only unlabelled splits such as transfer/ may omit it)",
                path=example.source,
                line=example.line,
            )
        return
    if known is not None and example.label not in known:
        shown = sorted(known)
        listed = ", ".join(shown[:30]) + (", ..." if len(shown) > 30 else "")
        raise LabelError(
            f"unknown label {example.label!r}; known labels ({len(shown)}): {listed}",
            path=example.source,
            line=example.line,
        )


# ----------------------------------------------------------------------------------------------------------------
# Model-ready arrays
# ----------------------------------------------------------------------------------------------------------------


def encode_split(
    root: str | os.PathLike[str],
    split: str,
    spec: PreprocessSpec,
    encoder: TextEncoder,
    labels: Sequence[str],
    require_labels: bool = True,
    *,
    cache: bool = True,
    limits: InputLimits | None = None,
    workers: int | None = None,
) -> EncodedSplit:
    """Read a split and turn it into arrays exactly as the server would (see `EncodedSplit`).

    Decoded images are cached in ROOT/.cache/<split>-<key>.npz, where the key covers the preprocessing spec, the
    image files in row order and each one's size and mtime, so an edited file invalidates the cache. The cache stores
    uint8 pixels when they reproduce the float tensors bit for bit (4x smaller), else float32. `cache=False`
    skips it; `workers` sets the decoding processes (None: all cores for large splits, one for small ones).
    """
    examples = read_split(root, split, labels, require_labels)
    limits = limits or InputLimits()
    texts = [_checked_text(ex, limits) for ex in examples]
    input_ids, attention_mask = encoder.encode(texts, pad_to=spec.max_text_length)  # (N, L)
    index = {label: i for i, label in enumerate(labels)}
    label_ids = np.array([index[ex.label] if ex.label is not None else -1 for ex in examples], dtype=np.int64)
    return EncodedSplit(
        pixel_values=load_pixels(Path(root), split, examples, spec, limits, cache=cache, workers=workers),
        input_ids=input_ids[:, : spec.max_text_length],
        attention_mask=attention_mask[:, : spec.max_text_length],
        labels=label_ids,
        qtypes=[ex.qtype for ex in examples],
        texts=texts,
        file_names=[ex.file_name for ex in examples],
    )


def _checked_text(example: Example, limits: InputLimits) -> str:
    try:
        return check_text(example.text, limits)
    except InputError as exc:
        raise DatasetFormatError(f"unusable text: {exc}", path=example.source, line=example.line) from exc


def load_pixels(
    root: Path,
    split: str,
    examples: Sequence[Example],
    spec: PreprocessSpec,
    limits: InputLimits,
    *,
    cache: bool = True,
    workers: int | None = None,
) -> np.ndarray:
    """float32 (N, 3, H, W) for the examples, from the cache when it is current."""
    cache_path = root / CACHE_DIR / f"{split}-{_cache_key(examples, spec)}.npz" if cache else None
    if cache_path is not None and cache_path.is_file():
        stored = _read_cache(cache_path)
        if stored is not None and stored.shape[0] == len(examples):
            return _to_float(stored, spec)
    stored = decode_all(examples, spec, limits, workers)
    if cache_path is not None:
        _write_cache(cache_path, stored)
    return _to_float(stored, spec)


def decode_all(
    examples: Sequence[Example], spec: PreprocessSpec, limits: InputLimits, workers: int | None = None
) -> np.ndarray:
    """Decode every image: uint8 (N, 3, H, W) when that is lossless for `spec`, else float32 tensors.

    Decoding runs at ~2,000 images/s per core, so large splits are spread over worker processes.
    """
    chunks = [(list(examples[i : i + DECODE_CHUNK]), spec, limits) for i in range(0, len(examples), DECODE_CHUNK)]
    if workers is None and len(examples) < PARALLEL_MIN:
        workers = 1
    parts = map_in_processes(_decode_chunk, chunks, workers)
    if not parts:
        return np.empty((0, 3, spec.image_size, spec.image_size), dtype=np.uint8)
    if any(part.dtype != np.uint8 for part in parts):
        parts = [_to_float(part, spec) for part in parts]
    return np.concatenate(parts)


def _decode_chunk(task: tuple[list[Example], PreprocessSpec, InputLimits]) -> np.ndarray:
    examples, spec, limits = task
    size = spec.image_size
    out: np.ndarray = np.empty((len(examples), 3, size, size), dtype=np.uint8)
    for i, example in enumerate(examples):
        tensor = decode_example(example, spec, limits)  # float32 (3, H, W)
        if out.dtype == np.uint8:
            pixels = _to_uint8(tensor, spec)
            if np.array_equal(_to_float(pixels[None], spec)[0], tensor):
                out[i] = pixels
                continue
            out = _to_float(out, spec)  # rows before i are exact; from here on keep floats
        out[i] = tensor
    return out


def decode_example(example: Example, spec: PreprocessSpec, limits: InputLimits) -> np.ndarray:
    """One image -> float32 (3, H, W) via the bundle's decode_image + image_to_array."""
    try:
        data = example.path.read_bytes()
        return image_to_array(decode_image(data, limits, field="image"), spec)
    except FileNotFoundError as exc:
        raise MissingImageError(
            f"image {example.file_name!r} not found (looked for {example.path})", path=example.source, line=example.line
        ) from exc
    except _IMAGE_ERRORS as exc:
        raise UnreadableImageError(
            f"image {example.file_name!r} ({example.path}) cannot be read: {exc}", path=example.source, line=example.line
        ) from exc


def _channel_stats(spec: PreprocessSpec) -> tuple[np.ndarray, np.ndarray]:
    """mean, std as float32 (3, 1, 1) in the tensor's channel order."""
    mean = np.asarray(spec.mean, np.float32)
    std = np.asarray(spec.std, np.float32)
    if spec.channel_order == "BGR":
        mean, std = mean[::-1], std[::-1]
    return mean.reshape(3, 1, 1), std.reshape(3, 1, 1)


def _to_uint8(tensor: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    mean, std = _channel_stats(spec)
    return np.clip(np.rint((tensor * std + mean) * 255.0), 0, 255).astype(np.uint8)


def _to_float(stored: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """uint8 pixels -> float32 tensors with the same float32 arithmetic as `image_to_array`; floats pass through.

    In place, chunk by chunk: no temporaries the size of the 1 GB array of a 20k split.
    """
    if stored.dtype != np.uint8:
        return stored.astype(np.float32, copy=False)
    mean, std = _channel_stats(spec)  # (3, 1, 1)
    out = np.empty(stored.shape, dtype=np.float32)
    for start in range(0, stored.shape[0], 1024):
        view = out[start : start + 1024]
        view[...] = stored[start : start + 1024]
        view *= np.float32(1.0 / 255.0)
        view -= mean
        view /= std
    return out


def _cache_key(examples: Sequence[Example], spec: PreprocessSpec) -> str:
    digest = hashlib.sha256(f"format={CACHE_FORMAT};spec={spec.fingerprint()}".encode())
    for example in examples:
        stat = example.path.stat()
        digest.update(f"\n{example.file_name}\t{stat.st_size}\t{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def _read_cache(path: Path) -> np.ndarray | None:
    try:
        with np.load(path, allow_pickle=False) as data:
            return data["pixels"]
    except (OSError, ValueError, KeyError):
        return None  # a damaged cache is rebuilt, never trusted


def _write_cache(path: Path, pixels: np.ndarray) -> None:
    """Atomic write; stale caches of the same split are removed. A read-only dataset just goes uncached."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp", dir=path.parent)
    except OSError:
        return
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, pixels=pixels)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError:
        Path(tmp).unlink(missing_ok=True)
        return
    split = path.stem.rsplit("-", 1)[0]
    for old in path.parent.glob("*.npz"):
        if old != path and old.stem.rsplit("-", 1)[0] == split:
            old.unlink(missing_ok=True)
