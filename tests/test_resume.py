"""kill -9 during student training, then the same command with --resume: it completes, and in deterministic
mode its final weights and metrics equal an uninterrupted run's."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from distill.cli import main
from distill.errors import CheckpointError

SETS = ["--set", "student.steps=80", "--set", "student.checkpoint_every=5", "--set", "student.eval_every=20"]


def _sets(reference: Path) -> list:
    return json.loads((reference / "sets.json").read_text())


def _cmd(out: Path, reference: Path, *extra: str) -> list:
    return [sys.executable, "-m", "distill.cli", "train", "--config", "tiny", "--out", str(out),
            "--data", str(reference / "data"), "--no-progress", *_sets(reference), *extra]


# Without and with cached teacher outputs: a resumed run refills the cache by recomputing, mid-cycle included.
@pytest.fixture(scope="module", params=[0, 2], ids=["live-teacher", "cached-teacher"])
def reference(request, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "run"
    sets = [*SETS, "--set", f"loss.teacher_cache_views={request.param}"]
    assert main(["train", "--config", "tiny", "--out", str(out), "--no-progress", *sets]) == 0
    (out / "sets.json").write_text(json.dumps(sets))
    return out


def _state(out: Path) -> dict:
    try:
        return json.loads((out / "student" / "last.state.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_kill_9_then_resume_matches_uninterrupted_run(reference: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen(_cmd(out, reference), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if 10 <= _state(out).get("step", 0) < 60:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "training finished before it could be killed: raise student.steps"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = _state(out)["step"]
    assert 0 < killed_at < 80 and not _state(out)["done"]

    resumed = subprocess.run(_cmd(out, reference, "--resume"), env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert _state(out)["done"] and _state(out)["step"] == 80

    a, b = load_file(str(reference / "student" / "best.safetensors")), load_file(str(out / "student" / "best.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume (killed at step {killed_at})"
    ma = json.loads((reference / "metrics.json").read_text())["student"]
    mb = json.loads((out / "metrics.json").read_text())["student"]
    assert ma["accuracy"] == mb["accuracy"] and ma["fidelity"] == mb["fidelity"]


def test_resume_with_a_different_config_is_refused(reference: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text((reference / "config.json").read_text())
    with pytest.raises(CheckpointError, match="different config"):
        from distill.config import load_config
        from distill.train import train_run

        train_run(load_config("tiny", ["seed=5"]), out, data=str(reference / "data"), resume=True, progress=False)
