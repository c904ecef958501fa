"""`mmkd-bench` end to end on tiny real bundles: sections run, files are written, verdicts are computed."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from tiny_bundle import build_repository  # noqa: E402

from benchmarks.cli import load_bundles, main, role_of


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return build_repository(tmp_path_factory.mktemp("repo") / "models", ("student", "teacher"))


def test_roles_come_from_folder_names(repo):
    bundles = load_bundles(repo)
    assert sorted(bundles) == ["student", "teacher"]
    assert role_of(bundles["student"][0]) == "student"


def test_missing_bundles_is_a_clear_error(tmp_path, capsys):
    assert main(["--bundles", str(tmp_path / "nothing"), "--out", str(tmp_path / "out")]) == 2
    assert "mmkd-export" in capsys.readouterr().err


def test_latency_only_run_writes_report(repo, tmp_path):
    out = tmp_path / "out"
    assert main(["--bundles", str(repo), "--out", str(out), "--quick", "--only", "latency",
                 "--batch-sizes", "1,4"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert {(r["model"], r["batch"]) for r in results["latency"]} == {
        ("student", 1), ("student", 4), ("teacher", 1), ("teacher", 4)}
    assert results["acceptance"][0]["status"] == "N/A"  # no batch-32 rows: not a guess
    assert results["acceptance"][1]["status"] in ("PASS", "MISS")
    assert (out / "latency_by_batch_cpu-2c.png").is_file() or list(out.glob("latency_by_batch_*.png"))


@pytest.mark.slow
def test_serving_run_measures_server_echo_and_batching(repo, tmp_path):
    out = tmp_path / "out"
    assert main(["--bundles", str(repo), "--out", str(out), "--quick", "--only", "serving",
                 "--concurrency", "1,4", "--duration", "0.5", "--server-arg=--intra-op-spinning"]) == 0
    results = json.loads((out / "results.json").read_text())
    targets = {(r["target"], r["model"], r.get("batching")) for r in results["serving"]}
    assert ("echo", "echo", "") in targets
    for model in ("student", "teacher"):
        assert {("mmkd-serve", model, "on"), ("mmkd-serve", model, "off")} <= targets
    assert all(r["error_count"] == 0 for r in results["serving"])
    assert all(r["server_cpu_ms"] > 0 and r["client_cpu_ms"] > 0 for r in results["serving"])
    report = (out / "report.md").read_text()
    assert "Batching gain" in report and "Where a request's time goes" in report
    assert '"intra_op_spinning": true' in (out / "logs" / "serve-student-on.log").read_text()  # --server-arg
