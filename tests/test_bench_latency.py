"""In-process latency harness on a tiny real bundle: sane percentiles, throughput, JSON-ready rows."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from tiny_bundle import build_tiny_bundle  # noqa: E402

from benchmarks.latency import TimingPlan, bench_bundle, bench_torch, discover_bundles, percentiles, time_calls
from benchmarks.machine import describe_machine
from benchmarks.samples import synthetic_samples
from export.bundle import load_bundle

PLAN = TimingPlan(warmup=1, min_repeats=5, min_time_s=0.05, max_time_s=1.0)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return load_bundle(build_tiny_bundle(tmp_path_factory.mktemp("b") / "student", name="student"))


def test_percentiles_are_ordered_and_exact_on_known_data():
    stats = percentiles(list(range(1, 101)))
    assert stats["p50_ms"] == pytest.approx(50.5)
    assert stats["p50_ms"] <= stats["p90_ms"] <= stats["p95_ms"] <= stats["p99_ms"]
    assert stats["min_ms"] == 1 and stats["mean_ms"] == pytest.approx(50.5)


def test_time_calls_warms_up_and_respects_min_repeats():
    calls = []
    times = time_calls(lambda: calls.append(1), TimingPlan(warmup=3, min_repeats=7, min_time_s=0.0))
    assert len(times) == 7 and len(calls) == 10  # 3 warm-up calls are not timed
    assert all(t >= 0 for t in times)


def test_bundle_rows_have_sane_numbers_and_serialise(bundle):
    rows = bench_bundle(bundle, synthetic_samples(4, 24), "student", (1, 8), PLAN, progress=lambda _: None)
    assert [r["batch"] for r in rows] == [1, 8]
    for row in rows:
        assert row["provider"] == "CPUExecutionProvider" and row["variant"] == "fp32"
        assert 0 < row["p50_ms"] <= row["p99_ms"] < 1000
        assert row["throughput"] == pytest.approx(row["batch"] * 1000 / row["p50_ms"])
        assert row["calls"] >= PLAN.min_repeats
    json.loads(json.dumps(rows))


def test_torch_eager_rows_use_the_same_inputs(bundle):
    import torch

    class Echo(torch.nn.Module):
        def forward(self, pixel_values, input_ids, attention_mask):
            assert pixel_values.shape[1:] == (3, 16, 16) and input_ids.shape == attention_mask.shape
            return pixel_values.mean(dim=(1, 2, 3))

    rows = bench_torch(Echo(), bundle, synthetic_samples(3, 24), "teacher", (1, 4), PLAN, progress=lambda _: None)
    assert [(r["runtime"], r["batch"]) for r in rows] == [("torch-eager", 1), ("torch-eager", 4)]


def test_discover_bundles_finds_folders_and_single_bundle(bundle):
    assert discover_bundles(bundle.path.parent) == {"student": bundle.path}
    assert discover_bundles(bundle.path) == {"student": bundle.path}


def test_machine_label_names_cpu_cores_and_libraries():
    info = describe_machine()
    assert info.cores >= 1 and info.cpu
    assert "onnxruntime" in info.label() and str(info.cores) in info.label()
    assert info.slug().startswith(info.device)
