"""The dataset folder loader: a user's own imagefolder (JSONL or CSV), errors that point at file and line,
unlabelled splits, and arrays identical to what the server computes from the same bytes."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from distill.data.folder import Example, dataset_tokenizer, encode_split, read_labels, read_split
from distill.data.generate import SplitSizes, generate_dataset
from distill.data.tokenizer import build_tokenizer
from distill.errors import (
    DatasetError,
    DatasetFormatError,
    EmptySplitError,
    LabelError,
    MissingImageError,
    UnreadableImageError,
)
from export.bundle import PreprocessSpec, TextEncoder, preprocess_images

COLOURS = {"red": (200, 30, 30), "blue": (30, 30, 200), "green": (30, 160, 30)}


def _png(colour: str, size: int = 40, mode: str = "RGB") -> bytes:
    image = Image.new("RGB", (size, size), COLOURS[colour])
    image.putpixel((3, 5), (255, 255, 255))
    buf = io.BytesIO()
    image.convert(mode).save(buf, format="PNG")
    return buf.getvalue()


def _write_split(root: Path, split: str, rows: list[dict], images: dict[str, bytes], fmt: str = "jsonl") -> Path:
    folder = root / split
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in images.items():
        (folder / name).write_bytes(data)
    if fmt == "jsonl":
        (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return folder / "metadata.jsonl"
    import csv

    with open(folder / "metadata.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["file_name", "text", "label"])
        writer.writeheader()
        writer.writerows(rows)
    return folder / "metadata.csv"


def _user_dataset(root: Path, fmt: str = "jsonl") -> Path:
    images = {f"{c}.png": _png(c) for c in COLOURS}
    rows = [
        {"file_name": "red.png", "text": "What colour is it?", "label": "red"},
        {"file_name": "blue.png", "text": "Which colour, exactly, is it?", "label": "blue"},
        {"file_name": "green.png", "text": "What colour is it?", "label": "green"},
    ]
    _write_split(root, "train", rows, images, fmt)
    _write_split(root, "test", rows[::-1], images, fmt)
    return root


def _encoder(spec: PreprocessSpec) -> TextEncoder:
    return TextEncoder(build_tokenizer(["What colour is it?", "Which colour, exactly, is it?"]), spec)


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_reads_a_user_folder(tmp_path: Path, fmt: str) -> None:
    root = _user_dataset(tmp_path, fmt)
    labels = read_labels(root)
    assert labels == ["blue", "green", "red"]  # no dataset.json: sorted train labels
    examples = read_split(root, "train", labels)
    assert [e.label for e in examples] == ["red", "blue", "green"]
    assert examples[1].text == "Which colour, exactly, is it?"  # CSV quoting of commas
    assert examples[0].path == root / "train" / "red.png" and examples[0].line == (1 if fmt == "jsonl" else 2)


def test_dataset_json_fixes_the_label_order(tmp_path: Path) -> None:
    root = _user_dataset(tmp_path)
    (root / "dataset.json").write_text(json.dumps({"labels": ["red", "green", "blue", "purple"]}))
    assert read_labels(root) == ["red", "green", "blue", "purple"]


def test_bad_dataset_json_names_the_file(tmp_path: Path) -> None:
    root = _user_dataset(tmp_path)
    (root / "dataset.json").write_text('{"labels": ["red",\n  "red"]}')
    with pytest.raises(DatasetFormatError, match=r"dataset.json: 'labels' has duplicates"):
        read_labels(root)
    (root / "dataset.json").write_text('{"labels": [\n  "red" "blue"]}')
    with pytest.raises(DatasetFormatError, match=r"dataset.json:2: bad JSON"):
        read_labels(root)


def test_encoded_arrays_equal_what_serving_computes(tmp_path: Path) -> None:
    root = _user_dataset(tmp_path)
    spec = PreprocessSpec(image_size=32, max_text_length=10)
    labels = read_labels(root)
    encoder = _encoder(spec)
    encoded = encode_split(root, "train", spec, encoder, labels)
    raw = [(root / "train" / name).read_bytes() for name in ("red.png", "blue.png", "green.png")]
    assert encoded.pixel_values.dtype == np.float32 and encoded.pixel_values.shape == (3, 3, 32, 32)
    assert np.array_equal(encoded.pixel_values, preprocess_images(raw, spec))  # bit for bit, resized too
    ids, mask = encoder.encode(encoded.texts, pad_to=10)
    assert np.array_equal(encoded.input_ids, ids) and np.array_equal(encoded.attention_mask, mask)
    assert encoded.input_ids.shape == (3, 10) and encoded.input_ids.dtype == np.int64
    assert encoded.labels.tolist() == [2, 0, 1] and len(encoded) == 3
    part = encoded.subset([2, 0])
    assert part.labels.tolist() == [1, 2] and part.texts == [encoded.texts[2], encoded.texts[0]]
    assert np.array_equal(part.pixel_values[1], encoded.pixel_values[0])


def test_cache_is_reused_and_invalidated_when_an_image_changes(tmp_path: Path) -> None:
    root = _user_dataset(tmp_path)
    spec = PreprocessSpec(image_size=40)
    labels, encoder = read_labels(root), _encoder(spec)
    first = encode_split(root, "train", spec, encoder, labels)
    caches = list((root / ".cache").glob("train-*.npz"))
    assert len(caches) == 1
    again = encode_split(root, "train", spec, encoder, labels)
    assert np.array_equal(again.pixel_values, first.pixel_values)
    (root / "train" / "red.png").write_bytes(_png("blue", mode="L"))  # a different (grayscale) image
    stat = (root / "train" / "red.png").stat()
    os.utime(root / "train" / "red.png", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    changed = encode_split(root, "train", spec, encoder, labels)
    assert not np.array_equal(changed.pixel_values[0], first.pixel_values[0])
    assert np.array_equal(changed.pixel_values[0], preprocess_images([_png("blue", mode="L")], spec)[0])
    assert len(list((root / ".cache").glob("train-*.npz"))) == 1, "the stale cache is removed"
    uncached = encode_split(root, "train", spec, encoder, labels, cache=False)
    assert np.array_equal(uncached.pixel_values, changed.pixel_values)


def test_unlabelled_split_is_accepted_where_allowed(tmp_path: Path) -> None:
    root = _user_dataset(tmp_path)
    _write_split(root, "transfer", [{"file_name": "x.png", "text": "What colour is it?"}], {"x.png": _png("red")})
    labels = read_labels(root)
    with pytest.raises(LabelError, match=r"transfer/metadata.jsonl:1: no 'label'"):
        read_split(root, "transfer", labels)
    examples = read_split(root, "transfer", labels, require_labels=False)
    assert examples[0].label is None
    encoded = encode_split(root, "transfer", PreprocessSpec(), _encoder(PreprocessSpec()), labels, require_labels=False)
    assert encoded.labels.tolist() == [-1]


def _broken(tmp_path: Path, rows: list[dict], images: dict[str, bytes] | None = None, fmt: str = "jsonl") -> Path:
    images = {"a.png": _png("red"), **(images or {})}
    good = [{"file_name": "a.png", "text": "What colour is it?", "label": "red"}] * 2
    return _write_split(tmp_path, "train", good + rows, images, fmt)


@pytest.mark.parametrize(
    ("row", "error", "message"),
    [
        ({"file_name": "gone.png", "text": "q?", "label": "red"}, MissingImageError, "image 'gone.png' not found"),
        ({"file_name": "a.png", "text": "q?"}, LabelError, "no 'label'"),
        ({"file_name": "a.png", "text": "q?", "label": "mauve"}, LabelError, "unknown label 'mauve'; known labels"),
        ({"file_name": "a.png", "text": "", "label": "red"}, DatasetFormatError, "'text' is missing or empty"),
        ({"text": "q?", "label": "red"}, DatasetFormatError, "'file_name' is missing"),
        ({"file_name": "../a.png", "text": "q?", "label": "red"}, DatasetFormatError, "stays inside"),
        ({"file_name": "a.png", "text": "q?", "label": 1.5}, DatasetFormatError, "'label' must be a string"),
    ],
)
def test_row_errors_name_file_and_line(tmp_path: Path, row: dict, error: type, message: str) -> None:
    meta = _broken(tmp_path, [row])
    with pytest.raises(error, match=message) as info:
        read_split(tmp_path, "train", ["red", "blue"])
    assert str(info.value).startswith(f"{meta}:3: ") and info.value.line == 3


def test_bad_json_names_the_line(tmp_path: Path) -> None:
    meta = _broken(tmp_path, [])
    meta.write_text(meta.read_text() + "\n{'file_name': 'a.png'}\n")  # blank line 3, bad line 4
    with pytest.raises(DatasetFormatError, match=r"metadata.jsonl:4: bad JSON"):
        read_split(tmp_path, "train")


def test_bad_csv_names_the_line(tmp_path: Path) -> None:
    meta = _broken(tmp_path, [], fmt="csv")
    meta.write_text(meta.read_text() + "a.png,What colour, then?,red\n")
    with pytest.raises(DatasetFormatError, match=r"metadata.csv:4: 1 more field"):
        read_split(tmp_path, "train")
    meta.write_text("file_name,question\na.png,hi\n")
    with pytest.raises(DatasetFormatError, match=r"metadata.csv:1: .*missing \['text'\]"):
        read_split(tmp_path, "train")


def test_unreadable_image_names_file_and_line(tmp_path: Path) -> None:
    meta = _broken(tmp_path, [{"file_name": "bad.png", "text": "q?", "label": "red"}], {"bad.png": b"not a png"})
    spec = PreprocessSpec()
    with pytest.raises(UnreadableImageError, match=r"bad.png") as info:
        encode_split(tmp_path, "train", spec, _encoder(spec), ["red"])
    assert str(info.value).startswith(f"{meta}:3: ")


def test_empty_and_missing_splits(tmp_path: Path) -> None:
    _write_split(tmp_path, "train", [], {})
    with pytest.raises(EmptySplitError, match=r"train/metadata.jsonl: the 'train' split has no rows"):
        read_split(tmp_path, "train")
    with pytest.raises(EmptySplitError, match=r"split folder 'validation' is missing \(found \['train'\]\)"):
        read_split(tmp_path, "validation")
    (tmp_path / "test").mkdir()
    with pytest.raises(EmptySplitError, match="no metadata.jsonl or metadata.csv"):
        read_split(tmp_path, "test")
    (tmp_path / "train" / "metadata.csv").write_text("file_name,text\n")
    with pytest.raises(DatasetFormatError, match="both metadata.jsonl and metadata.csv"):
        read_split(tmp_path, "train")


def test_all_dataset_errors_share_one_root(tmp_path: Path) -> None:
    with pytest.raises(DatasetError):
        read_split(tmp_path, "train")


def test_reads_the_generated_dataset(tmp_path: Path) -> None:
    root = tmp_path / "shapes"
    generate_dataset(root, SplitSizes(train=40, validation=10, test=10, transfer=20), seed=1, workers=1)
    labels = read_labels(root)
    spec = PreprocessSpec()
    encoder = TextEncoder(root / "tokenizer.json", spec)
    train = encode_split(root, "train", spec, encoder, labels)
    transfer = encode_split(root, "transfer", spec, encoder, labels, require_labels=False)
    assert train.pixel_values.shape == (40, 3, 64, 64) and (train.labels >= 0).all()
    assert (transfer.labels == -1).all() and all(q is not None for q in transfer.qtypes)
    first = read_split(root, "train", labels)[0]
    assert isinstance(first, Example) and labels[train.labels[0]] == first.label


def test_tokenizer_comes_from_the_dataset_or_is_built_from_train_texts(tmp_path: Path) -> None:
    root = _user_dataset(tmp_path)
    built, was_built = dataset_tokenizer(root)
    assert was_built and built.encode("Which colour, exactly, is it?").tokens[1:3] == ["which", "colour"]
    (root / "tokenizer.json").write_text(built.to_str())
    loaded, was_built = dataset_tokenizer(root)
    assert not was_built and loaded.to_str() == built.to_str()
    (root / "tokenizer.json").write_text("{nope")
    with pytest.raises(DatasetFormatError, match="tokenizer.json: not a tokenizers file"):
        dataset_tokenizer(root)
