"""Accuracy harness on tiny real bundles: metrics in range, the teacher is its own reference, labels checked."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from tiny_bundle import LABELS, QUESTIONS, build_tiny_bundle, make_image  # noqa: E402

from benchmarks.accuracy import evaluate
from benchmarks.errors import BenchSetupError
from benchmarks.samples import Sample
from export.bundle import load_bundle


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    root = tmp_path_factory.mktemp("b")
    return {"teacher": [load_bundle(build_tiny_bundle(root / "teacher", name="teacher", seed=0))],
            "student": [load_bundle(build_tiny_bundle(root / "student", name="student", seed=1))]}


def _samples(n=40):
    return [Sample(make_image(i), QUESTIONS[i % len(QUESTIONS)], LABELS[i % len(LABELS)]) for i in range(n)]


def test_rows_for_each_bundle_with_retention_and_fidelity(bundles):
    rows = evaluate(bundles, _samples(), progress=lambda _: None)
    assert [(r["model"], r["runtime"]) for r in rows] == [("teacher", "onnxruntime"), ("student", "onnxruntime")]
    teacher, student = rows
    assert teacher["retention"] == pytest.approx(1.0) and teacher["fidelity"] == 1.0
    for row in rows:
        assert row["n"] == 40 and 0.0 <= row["accuracy"] <= 1.0 and 0.0 <= row["macro_f1"] <= 1.0
    assert 0.0 <= student["fidelity"] <= 1.0


def test_unknown_labels_are_refused_with_a_hint(bundles):
    bad = [Sample(make_image(0), "is there a circle", "purple")]
    with pytest.raises(BenchSetupError, match="--data"):
        evaluate(bundles, bad, progress=lambda _: None)
