"""Crash safety: a truncated or corrupted checkpoint or bundle is refused with a message and never half-loaded;
bundles appear atomically (also under kill -9); training killed at random points always resumes."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from distill.runs import load_tensors, load_weights, save_tensors
from export.bundle import SPEC_FILE, BundleFormatError, BundleIntegrityError, load_bundle
from server.errors import ModelLoadError
from tiny_bundle import ServerThread, build_tiny_bundle, settings_for

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return build_tiny_bundle(tmp_path_factory.mktemp("b") / "tiny")


def copy_bundle(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


# ---- bundles ----------------------------------------------------------------------------------------------------

def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


DAMAGE = {"truncated model": ("model.onnx", _truncate, BundleIntegrityError, "model.onnx"),
          "one bit of the model": ("model.onnx", _flip, BundleIntegrityError, "model.onnx"),
          "truncated tokenizer": ("tokenizer.json", _truncate, BundleIntegrityError, "tokenizer.json"),
          "truncated bundle.json": (SPEC_FILE, _truncate, BundleFormatError, "not valid JSON"),
          "missing model": ("model.onnx", Path.unlink, BundleFormatError, "missing")}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_bundle_is_refused_by_the_loader_and_the_server(bundle, tmp_path, damage):
    name, hurt, error, needle = DAMAGE[damage]
    repo = tmp_path / "repo"
    copy_bundle(bundle, repo / "tiny")
    hurt(repo / "tiny" / name)
    with pytest.raises(error, match=needle):
        load_bundle(repo / "tiny")
    with pytest.raises(ModelLoadError, match=needle):  # the server refuses to start: nothing half-served
        ServerThread(settings_for(repo)).__enter__()


def test_a_failed_bundle_write_leaves_no_folder_and_keeps_the_old_bundle(bundle, tmp_path):
    from export.bundle import write_bundle

    spec = load_bundle(bundle).spec
    files = {"model.onnx": bundle / "model.onnx", "tokenizer.json": tmp_path / "missing.json"}
    with pytest.raises(OSError):
        write_bundle(tmp_path / "new", spec, files)
    assert not (tmp_path / "new").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    old = copy_bundle(bundle, tmp_path / "old")
    with pytest.raises(OSError):
        write_bundle(old, spec, files, overwrite=True)
    assert load_bundle(old).spec.name == spec.name  # still whole and verified


WRITER = """
import sys, time
from pathlib import Path
from export.bundle import load_bundle, write_bundle
src, out = Path(sys.argv[1]), Path(sys.argv[2])
spec = load_bundle(src).spec
payload = (src / "model.onnx").read_bytes() * 200  # a few MB, so a kill lands mid-write
files = {"model.onnx": payload, "tokenizer.json": src / "tokenizer.json"}
print("ready", flush=True)
while True:
    write_bundle(out, spec, files, overwrite=True)
"""


def test_bundles_appear_atomically_under_kill_9(bundle, tmp_path):
    """A writer rewriting a bundle in a loop is killed at random moments: whatever exists is a whole bundle."""
    rng = random.Random(0)
    out = tmp_path / "repo" / "tiny"
    out.parent.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for _ in range(4):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(bundle), str(out)], env=env,
                                stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.05, 0.6))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        if out.exists():
            assert load_bundle(out).spec.name == "tiny"
    # leftovers of interrupted writes are hidden folders, which the server's repository scan skips
    assert all(p.name.startswith(".") for p in out.parent.iterdir() if p != out)


# ---- checkpoints ------------------------------------------------------------------------------------------------

def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))


def _damaged_checkpoints(tmp_path: Path) -> dict[str, Path]:
    trained = _model()
    for p in trained.parameters():
        p.data.add_(1.0)
    good = save_tensors(tmp_path / "good.safetensors", trained.state_dict())
    data = good.read_bytes()
    cases = {"empty": b"", "header only": data[:8], "half": data[: len(data) // 2], "one byte short": data[:-1],
             "garbled header": data[:8] + b"\xff" * 16 + data[24:]}
    paths = {}
    for i, (name, blob) in enumerate(cases.items()):
        paths[name] = tmp_path / f"damaged-{i}.safetensors"
        paths[name].write_bytes(blob)
    return paths


def test_a_damaged_checkpoint_is_refused_and_the_model_keeps_its_weights(tmp_path):
    for name, path in _damaged_checkpoints(tmp_path).items():
        model = _model()
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(Exception) as err:  # noqa: PT011 - see the xfail below for the error type
            load_weights(model, path)
        assert str(err.value), name
        for key, value in model.state_dict().items():
            assert torch.equal(value, before[key]), f"{name}: {key} was half-loaded"


def test_a_damaged_checkpoint_error_is_a_checkpoint_error_naming_the_file(tmp_path):
    from distill.errors import CheckpointError

    path = _damaged_checkpoints(tmp_path)["half"]
    with pytest.raises(CheckpointError, match=path.name):
        load_tensors(path)


def _flip_tensor_data(path: Path) -> None:
    """Flip one bit in the middle of the tensor data (past the 8-byte length and the JSON header): the damage
    safetensors itself cannot see, since every offset and shape still fits."""
    data = bytearray(path.read_bytes())
    start = 8 + int.from_bytes(data[:8], "little")
    data[start + (len(data) - start) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _student_dir(root: Path) -> Path:
    """A RUN/student folder (card + best and last checkpoints) of the tiny student."""
    from distill.models import create_model
    from distill.runs import write_model_card

    torch.manual_seed(0)
    model = create_model("student_tiny", num_labels=3, vocab_size=20)
    (root / "tok.json").write_text("{}")
    write_model_card(root / "student", model_name="student_tiny", model_kwargs={"num_labels": 3, "vocab_size": 20},
                     labels=["a", "b", "c"], preprocess={"image_size": 64}, tokenizer_src=root / "tok.json")
    for tag in ("best", "last"):
        save_tensors(root / "student" / f"{tag}.safetensors", model.state_dict())
    return root / "student"


@pytest.mark.parametrize("tag", ["best", "last"])
def test_a_flipped_bit_in_the_tensor_data_is_refused_naming_the_file(tmp_path, tag):
    from distill.errors import CheckpointError
    from distill.runs import load_model_dir

    model_dir = _student_dir(tmp_path)
    if tag == "last":
        (model_dir / "best.safetensors").unlink()  # load_model_dir falls back to last
    load_model_dir(model_dir)  # whole: loads
    _flip_tensor_data(model_dir / f"{tag}.safetensors")
    with pytest.raises(CheckpointError, match=rf"{tag}\.safetensors does not match the sha256") as err:
        load_model_dir(model_dir)
    assert "another checkpoint" in str(err.value)  # says what to do


class _Step(nn.Module):
    """What the trainer checkpoints: the model and the loss's learned heads."""

    def __init__(self) -> None:
        super().__init__()
        self.model, self.loss = _model(), nn.Linear(3, 2)


def _resume_dir(root: Path) -> tuple[Path, _Step, torch.optim.Optimizer]:
    from distill.runs import save_train_state

    step = _Step()
    opt = torch.optim.AdamW(step.parameters(), lr=1e-3)
    step.loss(step.model(torch.randn(4, 8))).sum().backward()
    opt.step()
    save_train_state(root, step, opt, {"step": 7, "done": False})
    return root, step, opt


@pytest.mark.parametrize("where", ["tensor data", "resume state in the header"])
def test_a_damaged_resume_checkpoint_is_refused_naming_the_file(tmp_path, where):
    from distill.errors import CheckpointError
    from distill.runs import load_train_state

    model_dir, step, opt = _resume_dir(tmp_path)
    assert load_train_state(model_dir, step, opt)["step"] == 7
    path = model_dir / "resume.safetensors"
    if where == "tensor data":
        _flip_tensor_data(path)
    else:  # "step": 7 -> "step": 6, still valid JSON: only the recorded sha256 can tell
        data = path.read_bytes()
        assert data.count(b'\\"step\\": 7') == 1
        path.write_bytes(data.replace(b'\\"step\\": 7', b'\\"step\\": 6'))
    with pytest.raises(CheckpointError, match=r"resume\.safetensors does not match the sha256"):
        load_train_state(model_dir, step, opt)


def test_a_checkpoint_written_before_checksums_loads_with_a_warning(tmp_path):
    """Old run folders stay usable: no record means a warning, not a refusal."""
    from safetensors.torch import save_file

    model = _model()
    path = tmp_path / "old.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    with pytest.warns(UserWarning, match="no recorded sha256"):
        state = load_tensors(path)
    assert set(state) == set(model.state_dict())


# ---- training killed at random points ---------------------------------------------------------------------------

def _state(run: Path, which: str) -> dict:
    try:
        return json.loads((run / which / "last.state.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_training_killed_at_random_points_always_resumes(tmp_path):
    """kill -9 `mmkd-distill train --config tiny` at random moments (data generation, teacher, student), several
    times in a row on the same run folder; `--resume` each time; the run completes with a loadable student."""
    from distill.runs import load_model

    rng = random.Random(1234)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "distill.cli", "train", "--config", "tiny", "--out", str(run), "--no-progress"]
    # when to kill: at a random moment of start-up/data generation, then once the teacher, then once the student
    # has written a checkpoint, each plus a random few milliseconds so the kill lands mid-step or mid-write
    triggers = (lambda: True, lambda: _state(run, "teacher").get("step", 0) >= 4,
                lambda: _state(run, "student").get("step", 0) >= 4)
    kills = []
    for trial, ready in enumerate(triggers):
        proc = subprocess.Popen(cmd + (["--resume"] if trial else []), env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        if trial == 0:
            time.sleep(rng.uniform(0.5, 3.0))
        while proc.poll() is None and not ready() and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 0.05))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills.append({"trial": trial, "teacher": _state(run, "teacher"), "student": _state(run, "student")})
        proc.wait()
    final = subprocess.run(cmd + ["--resume"], env=env, capture_output=True, text=True, timeout=120)
    assert final.returncode == 0, final.stderr[-3000:]
    assert _state(run, "student").get("done") and _state(run, "teacher").get("done"), kills
    assert any(k["trial"] == 2 and not k["student"].get("done") for k in kills) or len(kills) >= 2, kills
    model, info = load_model(run, "student")
    assert info["labels"] and sum(p.numel() for p in model.parameters()) > 0
    assert kills, "no trial was killed: the sleeps are longer than a tiny training run"


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_kill_between_the_snapshot_and_its_copies_is_repaired_by_resume(tmp_path):
    """The window the random kills above hit now and then: resume.safetensors already holds the final step, but
    last.state.json (and last.safetensors) are still one checkpoint behind. --resume has no step left to train,
    so it must bring the copies up to date itself, or the run never says it is done."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "distill.cli", "train", "--config", "tiny", "--out", str(run), "--no-progress"]
    subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=300)
    final = _state(run, "teacher")
    assert final.get("done")
    stale = {**final, "step": final["step"] - 4, "done": False}  # what a kill inside save_train_state leaves
    (run / "teacher" / "last.state.json").write_text(json.dumps(stale))
    (run / "teacher" / "last.safetensors").write_bytes(b"")
    subprocess.run(cmd + ["--resume"], env=env, check=True, capture_output=True, timeout=300)
    assert _state(run, "teacher") == final
    assert set(load_tensors(run / "teacher" / "last.safetensors")) == set(load_tensors(run / "teacher" /
                                                                                       "best.safetensors"))
