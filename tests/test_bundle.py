"""The bundle format (export/bundle.py): typed spec, atomic write, verified load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from export.bundle import (
    BundleError,
    BundleFormatError,
    BundleIntegrityError,
    BundleSpec,
    PreprocessSpec,
    load_bundle,
    write_bundle,
)

FILES = {"model.onnx": b"\x08\x07fake-onnx-bytes" * 100, "tokenizer.json": b'{"version": "1.0"}', "parity.json": b"{}"}


def make_spec(**overrides) -> BundleSpec:
    fields = dict(name="student", labels=("red", "blue", "yes"), preprocess=PreprocessSpec(image_size=32),
                  variant="int8", provenance={"run": "runs/x", "config_hash": "abc"})
    return BundleSpec(**{**fields, **overrides})


def test_round_trip_keeps_every_field_and_hashes_every_file(tmp_path: Path):
    out = write_bundle(tmp_path / "student", make_spec(), FILES)
    bundle = load_bundle(out)
    assert bundle.spec.labels == ("red", "blue", "yes")
    assert bundle.spec.preprocess == PreprocessSpec(image_size=32)
    assert bundle.spec.variant == "int8" and bundle.spec.provenance["config_hash"] == "abc"
    assert sorted(bundle.spec.files) == sorted(FILES)
    assert bundle.model_path.read_bytes() == FILES["model.onnx"]
    assert BundleSpec.from_dict(json.loads((out / "bundle.json").read_text())) == bundle.spec


def test_one_changed_byte_in_the_model_is_refused_naming_the_file(tmp_path: Path):
    out = write_bundle(tmp_path / "b", make_spec(), FILES)
    data = bytearray((out / "model.onnx").read_bytes())
    data[10] ^= 0x01
    (out / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleIntegrityError, match=r"model\.onnx does not match its recorded sha256"):
        load_bundle(out)


def test_truncated_tokenizer_and_missing_file_are_refused(tmp_path: Path):
    out = write_bundle(tmp_path / "b", make_spec(), FILES)
    (out / "tokenizer.json").write_bytes(FILES["tokenizer.json"][:5])
    with pytest.raises(BundleIntegrityError, match="tokenizer.json"):
        load_bundle(out)
    (out / "parity.json").unlink()
    with pytest.raises(BundleFormatError, match="parity.json is listed in bundle.json but missing"):
        load_bundle(out)


def test_corrupt_or_unknown_spec_is_refused(tmp_path: Path):
    out = write_bundle(tmp_path / "b", make_spec(), FILES)
    (out / "bundle.json").write_text("{not json")
    with pytest.raises(BundleFormatError, match="not valid JSON"):
        load_bundle(out)
    (out / "bundle.json").write_text(json.dumps({**make_spec().to_dict(), "surprise": 1}))
    with pytest.raises(BundleFormatError, match="unknown keys \\['surprise'\\]"):
        load_bundle(out)
    with pytest.raises(BundleFormatError, match="bundle.json is missing"):
        load_bundle(tmp_path)


@pytest.mark.parametrize(
    "overrides, words",
    [
        (dict(variant="int4"), "variant must be one of"),
        (dict(labels=()), "labels must be a non-empty"),
        (dict(labels=("a", "a")), "labels must be unique"),
        (dict(name="../evil"), "name must match"),
        (dict(version=0), "version must be an int >= 1"),
    ],
)
def test_invalid_spec_fields_are_named(overrides, words):
    with pytest.raises(BundleFormatError, match=words):
        make_spec(**overrides)


def test_preprocess_spec_validation():
    with pytest.raises(BundleFormatError, match="resample must be one of"):
        PreprocessSpec(resample="sinc")
    with pytest.raises(BundleFormatError, match="std values must be > 0"):
        PreprocessSpec(std=(1.0, 0.0, 1.0))


def test_write_is_atomic_and_does_not_clobber(tmp_path: Path):
    write_bundle(tmp_path / "b", make_spec(), FILES)
    with pytest.raises(BundleError, match="already exists"):
        write_bundle(tmp_path / "b", make_spec(), FILES)
    with pytest.raises(BundleFormatError, match="required files missing"):
        write_bundle(tmp_path / "c", make_spec(), {"model.onnx": b"x"})
    assert not (tmp_path / "c").exists()
    # A failure half-way (unreadable source) leaves neither the target nor a temp folder behind.
    with pytest.raises(FileNotFoundError):
        write_bundle(tmp_path / "d", make_spec(), {**FILES, "extra.bin": tmp_path / "nope"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]
    # Overwrite swaps the whole folder in one rename.
    write_bundle(tmp_path / "b", make_spec(version=2), FILES, overwrite=True)
    assert load_bundle(tmp_path / "b").spec.version == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]
