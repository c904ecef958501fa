"""Evaluation numbers against hand-computed values, and the baselines machinery on the tiny config."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from distill.cli import main
from distill.metrics import classification_metrics, fidelity, per_group_accuracy


def test_classification_metrics_hand_values() -> None:
    # labels 0,0,1,2 ; predictions 0,1,1,2 -> acc 3/4; recall: c0 1/2, c1 1, c2 1
    logits = np.array([[3, 0, 0], [0, 2, 1], [0, 3, 0], [0, 0, 3]], dtype=float)
    labels = np.array([0, 0, 1, 2])
    m = classification_metrics(logits, labels, ["a", "b", "c"])
    assert m["accuracy"] == pytest.approx(0.75)
    assert m["per_class_recall"] == pytest.approx({"a": 0.5, "b": 1.0, "c": 1.0})
    # F1: a = 2*1/(2+1) = 2/3 ; b = 2*1/(1+2) = 2/3 ; c = 1
    assert m["macro_f1"] == pytest.approx((2 / 3 + 2 / 3 + 1) / 3)
    assert m["roc_auc_ovr"] == pytest.approx(np.mean([1.0, 1.0, 1.0]))  # each class's scores rank perfectly


def test_roc_auc_ties_count_half() -> None:
    logits = np.zeros((4, 2))
    m = classification_metrics(logits, np.array([0, 1, 0, 1]))
    assert m["roc_auc_ovr"] == pytest.approx(0.5)


def test_fidelity_and_groups() -> None:
    t = np.array([[2.0, 0.0], [0.0, 2.0]])
    f = fidelity(t, t)
    assert f == pytest.approx({"top1_agreement": 1.0, "mean_kl": 0.0}, abs=1e-9)
    f = fidelity(np.array([[0.0, 0.0], [0.0, 2.0]]), t)
    p = np.exp(2) / (np.exp(2) + 1)
    expected_kl = (p * np.log(p / 0.5) + (1 - p) * np.log((1 - p) / 0.5)) / 2
    assert f["mean_kl"] == pytest.approx(expected_kl, abs=1e-9)
    assert per_group_accuracy(t, np.array([0, 0]), ["x", "y"]) == {"x": 1.0, "y": 0.0}


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_baselines_report_both_regimes_and_single_modality(tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert main(["train", "--config", "tiny", "--out", str(out), "--baselines", "--no-progress",
                 "--set", "baselines.eval_every=2"]) == 0
    b = json.loads((out / "metrics.json").read_text())["baselines"]
    # a fair pick of the best checkpoint: every model validated at the same steps, whatever its epoch length
    looks = {d.name: [h["step"] for h in json.loads((d / "last.state.json").read_text())["history"]]
             for d in (out / "baselines").iterdir()}
    assert len(looks) == 10 and all(steps == [2, 4, 6] for steps in looks.values()), looks
    for key in ("a_full_kd", "a_full_scratch", "b_few_kd", "b_few_scratch"):
        assert len(b[key]["values"]) == 2 and b[key]["std"] >= 0.0
    assert b["few_labels"] == 40 and b["transfer_unlabelled"] == 240
    assert 0.0 <= b["image_only"] <= 1.0 and 0.0 <= b["text_only"] <= 1.0
    blind = json.loads((out / "baselines" / "image_only" / "model.json").read_text())
    assert blind["model_kwargs"]["base"] == "student_tiny"  # the configured student, blind to the question


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_baselines_in_two_processes_match_one(tmp_path: Path) -> None:
    """The tiny config runs one thread a model either way, so worker processes must change nothing but time."""
    runs = {}
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        assert main(["train", "--config", "tiny", "--out", str(out), "--baselines", "--no-progress",
                     "--set", f"baselines.workers={workers}"]) == 0
        runs[workers] = json.loads((out / "metrics.json").read_text())["baselines"]
    assert runs[1] == runs[2]
