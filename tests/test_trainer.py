"""`mmkd-distill train` and `eval` end to end on the tiny config: the run folder others rely on, metrics,
teacher reuse, the CLI contract. Tiny models and a 120-sample dataset: seconds, not accuracy."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from distill.cli import main
from distill.config import load_config
from distill.errors import ConfigError
from distill.runs import load_data, load_model
from distill.train import lr_at, train_phase

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run") / "r"
    assert main(["train", "--config", "tiny", "--out", str(out), "--no-progress"]) == 0
    return out


def test_run_folder_has_everything_export_needs(run_dir: Path) -> None:
    for which in ("teacher", "student"):
        for name in ("model.json", "tokenizer.json", "best.safetensors", "last.safetensors", "last.state.json"):
            assert (run_dir / which / name).is_file(), f"{which}/{name} missing"
    cfg = json.loads((run_dir / "config.json").read_text())
    assert cfg["hash"] == load_config("tiny").hash()
    model, info = load_model(run_dir, "student")
    assert info["model_name"] == "student_tiny" and len(info["labels"]) > 10
    assert info["preprocess"]["image_size"] == 64 and Path(info["tokenizer"]).is_file()
    x = torch.zeros(2, 3, 64, 64)
    ids = torch.ones(2, 5, dtype=torch.long)
    assert model(x, ids, torch.ones_like(ids)).logits.shape == (2, len(info["labels"]))


def test_metrics_cover_the_acceptance_list(run_dir: Path) -> None:
    m = json.loads((run_dir / "metrics.json").read_text())
    for which in ("teacher", "student"):
        for key in ("accuracy", "macro_f1", "roc_auc_ovr", "per_class_recall", "params", "flops",
                    "per_question_type_accuracy"):
            assert key in m[which], f"{which}.{key} missing"
    assert set(m["student"]["fidelity"]) == {"top1_agreement", "mean_kl"}
    assert m["teacher"]["params"] > m["student"]["params"]


def test_later_run_reuses_the_teacher_folder(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "r2"
    code = main(["train", "--config", "tiny", "--out", str(out), "--data", str(run_dir / "data"),
                 "--teacher", str(run_dir / "teacher"), "--no-progress"])
    assert code == 0
    assert not (out / "teacher").exists()  # nothing retrained
    m1 = json.loads((run_dir / "metrics.json").read_text())
    m2 = json.loads((out / "metrics.json").read_text())
    assert m2["teacher"]["accuracy"] == m1["teacher"]["accuracy"]


def test_eval_command_rewrites_metrics(run_dir: Path, capsys) -> None:
    assert main(["eval", "--run", str(run_dir)]) == 0
    assert "student" in capsys.readouterr().out


def test_unknown_override_fails_before_training(tmp_path: Path) -> None:
    code = main(["train", "--config", "tiny", "--out", str(tmp_path / "x"), "--set", "student.nope=1"])
    assert code != 0
    assert not (tmp_path / "x").exists()


def test_lr_schedule_warms_up_then_decays() -> None:
    phase = load_config("tiny", ["student.steps=100", "student.warmup_steps=10", "student.lr=1.0"]).student
    lrs = [lr_at(s, phase) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])) and lrs[-1] < 0.01


def test_wsd_schedule_holds_then_decays_over_the_last_share() -> None:
    phase = load_config("tiny", ["student.steps=100", "student.warmup_steps=10", "student.lr=1.0",
                                 "student.schedule=wsd", "student.decay_fraction=0.25"]).student
    lrs = [lr_at(s, phase) for s in range(100)]
    assert lrs[9] == pytest.approx(1.0) and lrs[74] == pytest.approx(1.0)  # stable until 75% of the steps
    assert all(a >= b for a, b in zip(lrs[75:], lrs[76:])) and lrs[-1] < 0.01 and lrs[80] < 1.0


def test_wsd_rejects_a_decay_fraction_outside_0_1() -> None:
    with pytest.raises(ConfigError, match="decay_fraction"):
        load_config("tiny", ["student.schedule=wsd", "student.decay_fraction=1.5"])


def _distil(run_dir: Path, out: Path, overrides: list[str]) -> tuple[torch.nn.Module, int]:
    """Distil the tiny student from the run's teacher; returns it and how many teacher forwards ran."""
    cfg = load_config("tiny", overrides)
    bundle = load_data(run_dir / "data", cfg, out)
    teacher, _ = load_model(run_dir, "teacher")
    calls: list[int] = []
    teacher.register_forward_hook(lambda *_: calls.append(1))
    student = train_phase("student", cfg.student, {"ce": 1.0, "kd": 1.0, "feature": 0.5}, bundle, out / "s", cfg,
                          teacher=teacher, progress=False)
    return student, len(calls) - 1  # less the one call that reads the teacher's output sizes


def test_teacher_cache_runs_the_teacher_only_while_filling_its_views(run_dir: Path, tmp_path: Path) -> None:
    cfg = load_config("tiny")
    per_epoch = len(load_data(run_dir / "data", cfg, tmp_path).splits["train"].labels) // cfg.student.batch_size
    _, calls = _distil(run_dir, tmp_path / "cached", ["loss.teacher_cache_views=2", f"student.steps={5 * per_epoch}"])
    assert calls == 2 * per_epoch
    _, calls = _distil(run_dir, tmp_path / "live", [f"student.steps={5 * per_epoch}"])
    assert calls == 5 * per_epoch


def test_teacher_cache_changes_nothing_within_its_first_cycle(run_dir: Path, tmp_path: Path) -> None:
    """Before any replay the cached run must be the uncached run, weight for weight (same batches, same views)."""
    a, _ = _distil(run_dir, tmp_path / "a", ["loss.teacher_cache_views=1", "student.steps=5"])
    b, _ = _distil(run_dir, tmp_path / "b", ["student.steps=5"])
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name


def test_teacher_cache_refuses_spatial_hints() -> None:
    with pytest.raises(ConfigError, match="teacher_cache_views"):
        load_config("tiny", ["loss.teacher_cache_views=2", "loss.spatial=1.0"])
