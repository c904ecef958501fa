"""The model bundle: the one contract between export and serving, and the one home of inference preprocessing.

This module is the bottom layer of mmkd. It imports nothing of ours and never imports torch, so that training-time
evaluation, the export parity gate and the server all turn raw bytes and text into tensors with the same code.

A bundle is a folder::

    model.onnx      pixel_values f32 [B,3,H,W], input_ids i64 [B,L], attention_mask i64 [B,L] -> logits f32 [B,C]
    tokenizer.json  a Hugging Face `tokenizers` file
    bundle.json     BundleSpec: labels, preprocessing, variant, provenance, sha256 of every other file
    parity.json     how the ONNX graph compared with torch (written by the exporter)

Bundles are written atomically (a temp folder beside the target, then a rename) and verified on load: a bundle
whose files do not match their recorded sha256 is refused with a message naming the file.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import os
import re
import shutil
import struct
import uuid
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

FORMAT_VERSION = 1
SPEC_FILE = "bundle.json"
MODEL_FILE = "model.onnx"
TOKENIZER_FILE = "tokenizer.json"
PARITY_FILE = "parity.json"
REQUIRED_FILES = (MODEL_FILE, TOKENIZER_FILE)
INPUT_NAMES = ("pixel_values", "input_ids", "attention_mask")
VARIANTS = ("fp32", "int8", "fp16")
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")

_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


# ----------------------------------------------------------------------------------------------------------------
# Errors. Bundle problems and bad request input are different audiences: an operator fixes the first, a client
# the second, so they share no base class.
#
#   BundleError
#   ├── BundleFormatError     missing or malformed bundle.json, missing file, invalid spec
#   └── BundleIntegrityError  a file's sha256 differs from the one recorded at export
#   InputError (ValueError)   .field names the request field at fault
#   ├── ImageDecodeError      not a PNG/JPEG/WebP we can decode
#   ├── ImageTooLargeError    too many encoded bytes or too many pixels (decompression bombs)
#   ├── TextEmptyError
#   └── TextTooLongError
# ----------------------------------------------------------------------------------------------------------------


class BundleError(Exception):
    """A model bundle cannot be written or loaded."""


class BundleFormatError(BundleError):
    """The bundle folder or its bundle.json does not follow the format."""


class BundleIntegrityError(BundleError):
    """A bundle file changed after export (its sha256 no longer matches bundle.json)."""


class InputError(ValueError):
    """A request input is unusable; `field` names the input so clients can fix it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message

    def __reduce__(self) -> tuple:
        """Pickle as (field, message): a model process sends a request's InputError back to the server."""
        return type(self), (self.field, self.message)


class ImageDecodeError(InputError):
    """The image bytes are not a decodable PNG, JPEG or WebP."""


class ImageTooLargeError(InputError):
    """The image exceeds the encoded-size or pixel-count limit."""


class TextEmptyError(InputError):
    """The text is empty or only whitespace."""


class TextTooLongError(InputError):
    """The text exceeds the character limit."""


# ----------------------------------------------------------------------------------------------------------------
# Typed spec
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PreprocessSpec:
    """Everything needed to turn raw inputs into model tensors; stored in every bundle and run folder.

    >>> PreprocessSpec(image_size=64, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)).max_text_length
    32
    """

    image_size: int = 64
    resample: str = "bilinear"
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    channel_order: str = "RGB"
    max_text_length: int = 32
    lowercase: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        problems = []
        if not isinstance(self.image_size, int) or not 8 <= self.image_size <= 4096:
            problems.append(f"image_size must be an int in [8, 4096], got {self.image_size!r}")
        if self.resample not in _RESAMPLE:
            problems.append(f"resample must be one of {sorted(_RESAMPLE)}, got {self.resample!r}")
        if len(self.mean) != 3 or len(self.std) != 3:
            problems.append("mean and std need 3 values (one per channel)")
        elif any(s <= 0 for s in self.std):
            problems.append(f"std values must be > 0, got {self.std}")
        if self.channel_order not in ("RGB", "BGR"):
            problems.append(f"channel_order must be 'RGB' or 'BGR', got {self.channel_order!r}")
        if not isinstance(self.max_text_length, int) or not 1 <= self.max_text_length <= 8192:
            problems.append(f"max_text_length must be an int in [1, 8192], got {self.max_text_length!r}")
        if problems:
            raise BundleFormatError("invalid preprocessing spec: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "PreprocessSpec":
        return cls(**_known_keys(cls, data, "preprocess"))

    def fingerprint(self) -> str:
        """Short stable hash, e.g. to key caches of preprocessed arrays."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class InputLimits:
    """Per-request limits; defaults are documented in the README and overridable in the server settings.

    >>> InputLimits(max_text_chars=512).max_image_bytes
    8388608
    """

    max_image_bytes: int = 8 * 1024 * 1024
    max_image_pixels: int = 4096 * 4096
    max_text_chars: int = 1024

    def __post_init__(self) -> None:
        for name in ("max_image_bytes", "max_image_pixels", "max_text_chars"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"InputLimits.{name} must be a positive int, got {value!r}")


@dataclass(frozen=True)
class BundleSpec:
    """The typed content of bundle.json."""

    name: str
    labels: tuple[str, ...]
    preprocess: PreprocessSpec = field(default_factory=PreprocessSpec)
    version: int = 1
    task: str = "image-text-classification"
    variant: str = "fp32"
    outputs: tuple[str, ...] = ("logits",)
    provenance: dict[str, Any] = field(default_factory=dict)
    session: dict[str, Any] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", tuple(self.labels))
        object.__setattr__(self, "outputs", tuple(self.outputs))
        problems = []
        if not isinstance(self.name, str) or not _NAME_RE.match(self.name):
            problems.append(f"name must match {_NAME_RE.pattern}, got {self.name!r}")
        if not self.labels or any(not isinstance(x, str) or not x for x in self.labels):
            problems.append("labels must be a non-empty list of non-empty strings")
        elif len(set(self.labels)) != len(self.labels):
            problems.append("labels must be unique")
        if not isinstance(self.version, int) or self.version < 1:
            problems.append(f"version must be an int >= 1, got {self.version!r}")
        if self.variant not in VARIANTS:
            problems.append(f"variant must be one of {VARIANTS}, got {self.variant!r}")
        if "logits" not in self.outputs:
            problems.append("outputs must include 'logits'")
        if self.format_version != FORMAT_VERSION:
            problems.append(f"format_version {self.format_version} is not supported (this mmkd reads {FORMAT_VERSION})")
        if problems:
            raise BundleFormatError("invalid bundle spec: " + "; ".join(problems))

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data.update(labels=list(self.labels), outputs=list(self.outputs), preprocess=self.preprocess.to_dict())
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "BundleSpec":
        kwargs = _known_keys(cls, data, "bundle.json")
        kwargs["preprocess"] = PreprocessSpec.from_dict(kwargs.get("preprocess", {}))
        return cls(**kwargs)


def _known_keys(cls: type, data: Mapping[str, Any], where: str) -> dict[str, Any]:
    if not isinstance(data, Mapping):
        raise BundleFormatError(f"{where}: expected an object, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise BundleFormatError(f"{where}: unknown keys {unknown}; known keys are {sorted(known)}")
    try:
        return dict(data)
    except TypeError as exc:  # pragma: no cover - Mapping guarantees dict() works
        raise BundleFormatError(f"{where}: {exc}") from exc


# ----------------------------------------------------------------------------------------------------------------
# Writing and loading
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Bundle:
    """A verified bundle on disk."""

    path: Path
    spec: BundleSpec

    def file(self, name: str) -> Path:
        if name not in self.spec.files:
            raise BundleFormatError(f"bundle {self.path}: no file {name!r} (has {sorted(self.spec.files)})")
        return self.path / name

    @property
    def model_path(self) -> Path:
        return self.file(MODEL_FILE)

    @property
    def tokenizer_path(self) -> Path:
        return self.file(TOKENIZER_FILE)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_bundle(
    out_dir: str | os.PathLike[str],
    spec: BundleSpec,
    files: Mapping[str, str | os.PathLike[str] | bytes],
    *,
    overwrite: bool = False,
) -> Path:
    """Write a bundle folder atomically and return its path.

    `files` maps a file name inside the bundle to a source path or to bytes; `model.onnx` and `tokenizer.json`
    are required. The sha256 of every file goes into bundle.json. Readers never see a half-written bundle: the
    folder is assembled beside the target and renamed into place.
    """
    out = Path(out_dir)
    missing = [name for name in REQUIRED_FILES if name not in files]
    if missing:
        raise BundleFormatError(f"cannot write bundle {out}: required files missing: {missing}")
    if SPEC_FILE in files:
        raise BundleFormatError(f"cannot write bundle {out}: {SPEC_FILE} is generated, do not pass it")
    if out.exists() and not overwrite:
        raise BundleError(f"{out} already exists; pass overwrite=True (or --force) to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        hashes = {}
        for name, source in files.items():
            if "/" in name or name.startswith("."):
                raise BundleFormatError(f"bundle file names must be plain names, got {name!r}")
            target = tmp / name
            if isinstance(source, (bytes, bytearray)):
                target.write_bytes(source)
            else:
                shutil.copyfile(source, target)
            _fsync(target)
            hashes[name] = sha256_file(target)
        final = dataclasses.replace(spec, files=hashes)
        (tmp / SPEC_FILE).write_text(json.dumps(final.to_dict(), indent=2, sort_keys=True) + "\n")
        _fsync(tmp / SPEC_FILE)
        _swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def load_bundle(path: str | os.PathLike[str]) -> Bundle:
    """Load and verify a bundle: the spec must parse and every listed file must match its sha256."""
    root = Path(path)
    spec_path = root / SPEC_FILE
    if not root.is_dir():
        raise BundleFormatError(f"bundle {root}: not a folder")
    if not spec_path.is_file():
        raise BundleFormatError(f"bundle {root}: {SPEC_FILE} is missing")
    try:
        data = json.loads(spec_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleFormatError(f"bundle {root}: {SPEC_FILE} is not valid JSON ({exc})") from exc
    try:
        spec = BundleSpec.from_dict(data)
    except (BundleFormatError, TypeError, ValueError) as exc:
        raise BundleFormatError(f"bundle {root}: {exc}") from exc
    for name in REQUIRED_FILES:
        if name not in spec.files:
            raise BundleFormatError(f"bundle {root}: {SPEC_FILE} lists no {name}")
    for name, expected in sorted(spec.files.items()):
        file_path = root / name
        if not file_path.is_file():
            raise BundleFormatError(f"bundle {root}: {name} is listed in {SPEC_FILE} but missing")
        actual = sha256_file(file_path)
        if actual != expected:
            raise BundleIntegrityError(
                f"bundle {root}: {name} does not match its recorded sha256 (expected {expected[:12]}…, "
                f"found {actual[:12]}…); the file was modified or corrupted after export — re-export the bundle"
            )
    return Bundle(path=root, spec=spec)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _swap_into_place(tmp: Path, out: Path) -> None:
    """Rename tmp to out; an existing out is moved aside first and removed only after the swap."""
    if not out.exists():
        os.replace(tmp, out)
    else:
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    dir_fd = os.open(out.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


# ----------------------------------------------------------------------------------------------------------------
# Preprocessing: raw image bytes and text to model tensors
# ----------------------------------------------------------------------------------------------------------------


def decode_image(data: bytes, limits: InputLimits = InputLimits(), *, field: str = "image") -> Image.Image:
    """Decode PNG/JPEG/WebP bytes to an RGB image with its EXIF orientation applied.

    Limits are checked before pixels are decoded: the header's declared size is enough to refuse a
    decompression bomb without allocating it.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ImageDecodeError(field, f"expected encoded image bytes, got {type(data).__name__}")
    if len(data) == 0:
        raise ImageDecodeError(field, "is empty (0 bytes); send PNG, JPEG or WebP bytes")
    if len(data) > limits.max_image_bytes:
        raise ImageTooLargeError(
            field, f"is {len(data):,} bytes, over the limit of {limits.max_image_bytes:,} bytes"
        )
    try:
        with warnings.catch_warnings():  # Pillow warns (to stderr) past 89M pixels; treat it as the refusal it is
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(bytes(data)))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLargeError(field, f"declares too many pixels ({_short(exc)})") from exc
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise ImageDecodeError(field, f"is not a decodable image ({_short(exc)}); send PNG, JPEG or WebP") from exc
    if image.format not in IMAGE_FORMATS:
        raise ImageDecodeError(field, f"format {image.format} is not accepted; send PNG, JPEG or WebP")
    width, height = image.size
    if width < 1 or height < 1:
        raise ImageDecodeError(field, f"has an empty size {width}x{height}")
    if width * height > limits.max_image_pixels:
        raise ImageTooLargeError(
            field, f"is {width}x{height} = {width * height:,} pixels, over the limit of {limits.max_image_pixels:,}"
        )
    try:
        image.load()
        image = ImageOps.exif_transpose(image)
        return _to_rgb(image)
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(field, f"declares too many pixels ({_short(exc)})") from exc
    except (OSError, ValueError, SyntaxError, EOFError, struct.error) as exc:
        raise ImageDecodeError(field, f"is truncated or corrupt ({_short(exc)})") from exc


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any mode to 8-bit RGB. 16-bit and float greyscale are rescaled, not clipped, so they stay visible."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        scale = 65535.0 if image.mode.startswith("I;16") or array.max(initial=0) > 255 else 255.0
        array = np.clip(array / scale * 255.0, 0, 255).round().astype(np.uint8)
        image = Image.fromarray(array)  # uint8 (H, W) -> mode "L"
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return image if image.mode == "RGB" else image.convert("RGB")


def _short(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 160 else text[:157] + "..."


def image_to_array(image: Image.Image, spec: PreprocessSpec) -> np.ndarray:
    """RGB image -> normalised float32 (3, H, W).

    An 8-bit channel has only 256 values, so normalisation is a table look-up per channel: about three times
    cheaper than float arithmetic over every pixel (it runs once per request in the server) and bit-identical to
    it, because the table holds exactly what `(x / 255 - mean) / std` computes in float32 for each x."""
    size = (spec.image_size, spec.image_size)
    if image.size != size:
        image = image.resize(size, _RESAMPLE[spec.resample])
    pixels = np.asarray(image)  # (H, W, 3) uint8
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"image_to_array needs an 8-bit RGB image, got mode {image.mode}; decode with decode_image")
    table = _normalisation_table(spec.mean, spec.std)  # (3, 256)
    order = (2, 1, 0) if spec.channel_order == "BGR" else (0, 1, 2)
    out = np.empty((3,) + pixels.shape[:2], np.float32)  # (3, H, W)
    for dst, src in enumerate(order):
        np.take(table[src], pixels[:, :, src], out=out[dst])
    return out


@functools.lru_cache(maxsize=16)
def _normalisation_table(mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """(3, 256) float32: row c holds (x / 255 - mean[c]) / std[c] for x = 0..255, in float32 arithmetic."""
    values = np.arange(256, dtype=np.float32)[:, None] * np.float32(1.0 / 255.0)  # (256, 1)
    table = (values - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)  # (256, 3)
    table = np.ascontiguousarray(table.T)
    table.setflags(write=False)
    return table


def preprocess_image(data: bytes, spec: PreprocessSpec, limits: InputLimits = InputLimits()) -> np.ndarray:
    return image_to_array(decode_image(data, limits), spec)


def preprocess_images(
    images: Sequence[bytes], spec: PreprocessSpec, limits: InputLimits = InputLimits()
) -> np.ndarray:
    """Encoded images -> float32 (B, 3, H, W). The first bad image raises; its index is in the field name."""
    arrays = [image_to_array(decode_image(data, limits, field=f"image[{i}]"), spec) for i, data in enumerate(images)]
    if not arrays:
        return np.zeros((0, 3, spec.image_size, spec.image_size), np.float32)
    return np.stack(arrays)


def check_text(text: object, limits: InputLimits = InputLimits(), *, field: str = "text") -> str:
    """Validate one text input and return it."""
    if not isinstance(text, str):
        raise InputError(field, f"expected a string, got {type(text).__name__}")
    if not text.strip():
        raise TextEmptyError(field, "is empty; send a question about the image")
    if len(text) > limits.max_text_chars:
        raise TextTooLongError(field, f"has {len(text):,} characters, over the limit of {limits.max_text_chars:,}")
    return text


class TextEncoder:
    """Texts -> (input_ids, attention_mask) int64 (B, L), padded to the longest in the batch.

    Truncation happens at `spec.max_text_length` tokens (special tokens included), so the graph never sees a
    sequence longer than the model was trained with.
    """

    def __init__(
        self,
        tokenizer: "str | os.PathLike[str] | Any",
        spec: PreprocessSpec,
        limits: InputLimits = InputLimits(),
    ) -> None:
        from tokenizers import Tokenizer

        if isinstance(tokenizer, (str, os.PathLike)):
            try:
                tokenizer = Tokenizer.from_file(str(tokenizer))
            except Exception as exc:  # tokenizers raises a bare Exception for bad files
                raise BundleFormatError(f"cannot read tokenizer {tokenizer}: {_short(exc)}") from exc
        else:
            tokenizer = Tokenizer.from_str(tokenizer.to_str())  # our own copy: we change its settings
        tokenizer.no_padding()
        tokenizer.enable_truncation(max_length=spec.max_text_length)
        self.tokenizer = tokenizer
        self.spec = spec
        self.limits = limits
        self.pad_id = self._pad_id(tokenizer)

    @staticmethod
    def _pad_id(tokenizer: Any) -> int:
        for token in ("[PAD]", "<pad>", "<|pad|>", "<|endoftext|>"):
            token_id = tokenizer.token_to_id(token)
            if token_id is not None:
                return int(token_id)
        return 0

    def encode(self, texts: Sequence[str], pad_to: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        checked = [check_text(t, self.limits, field="text" if len(texts) == 1 else f"text[{i}]") for i, t in enumerate(texts)]
        if self.spec.lowercase:
            checked = [t.lower() for t in checked]
        if len(checked) == 1:  # encode_batch hands even one text to a thread pool: a wake-up per request
            encodings = [self.tokenizer.encode(checked[0], add_special_tokens=True)]
        else:
            encodings = self.tokenizer.encode_batch(checked, add_special_tokens=True)
        length = max([1, pad_to or 0] + [len(e.ids) for e in encodings])
        input_ids = np.full((len(checked), length), self.pad_id, dtype=np.int64)
        attention_mask = np.zeros((len(checked), length), dtype=np.int64)
        for row, encoding in enumerate(encodings):
            ids = encoding.ids
            input_ids[row, : len(ids)] = ids
            attention_mask[row, : len(ids)] = 1
        return input_ids, attention_mask

    @property
    def vocab_size(self) -> int:
        return int(self.tokenizer.get_vocab_size(with_added_tokens=True))
