"""The parity gate: it passes a faithful graph and catches broken ones with a message that says how."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from export.bundle import TextEncoder
from export.onnx_export import check_onnx, export_onnx, validate_graph
from export.parity import GateThresholds, compare, gate, plan_batches
from export.session import logits_runner, make_session, session_config
from export.api import torch_runner

import export_helpers as h


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("parity")
    model = h.tiny_model()
    return {"tmp": tmp, "model": model, "encoder": TextEncoder(h.write_tokenizer(tmp / "tok.json"), h.SPEC),
            "samples": h.make_samples(256), "ref": torch_runner(model)}


def test_plan_batches_covers_every_sample_once_and_cycles_sizes():
    plan = plan_batches(256, (1, 7, 64))
    assert plan[0] == (0, 1) and plan[1] == (1, 8) and plan[2] == (8, 72)
    covered = [i for a, b in plan for i in range(a, b)]
    assert covered == list(range(256))
    with pytest.raises(ValueError):
        plan_batches(10, (0,))


def test_faithful_export_passes_with_every_axis_exercised(world):
    path = world["tmp"] / "good.onnx"
    export_onnx(world["model"], path, image_size=h.SPEC.image_size, vocab_size=h.vocab_size())
    session = make_session(path, session_config("fp32"))
    m = compare(world["ref"], logits_runner(session), world["samples"], h.SPEC, world["encoder"])
    assert gate(m, "fp32") == []
    assert m["compared"] == 256 and m["top1_agreement"] == 1.0 and m["max_abs_diff"] <= 1e-4
    assert {1, 7, 64} <= set(m["batch_sizes"])
    assert m["length_sweep"]["sequence_lengths"] == list(range(1, h.SPEC.max_text_length + 1))
    assert m["accuracy"]["reference"] == m["accuracy"]["onnx"]


def test_gate_catches_graph_with_baked_in_sequence_length(world):
    """The legacy TorchScript exporter declares a dynamic `sequence` axis but bakes L into the
    MultiheadAttention reshapes: names and shapes look right, only running other lengths shows it."""
    path = world["tmp"] / "legacy.onnx"
    example = tuple(torch.from_numpy(x) for x in _feeds_at(world, 16).values())
    axes = {"pixel_values": {0: "batch"}, "input_ids": {0: "batch", 1: "sequence"},
            "attention_mask": {0: "batch", 1: "sequence"}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(world["model"], example, str(path), dynamo=False, dynamic_axes=axes,
                          input_names=["pixel_values", "input_ids", "attention_mask"],
                          output_names=["logits", "text_embed"])
    validate_graph(check_onnx(path), image_size=h.SPEC.image_size, num_labels=len(h.LABELS),
                   output_names=["logits", "text_embed"])  # the contract check cannot see it
    session = make_session(path, session_config("fp32"))
    m = compare(world["ref"], logits_runner(session), world["samples"], h.SPEC, world["encoder"])
    fails = gate(m, "fp32")
    assert fails, "the gate passed a graph that cannot run at other sequence lengths"
    assert any("ONNX Runtime failed" in f and "L=" in f for f in fails)
    assert any("samples could not run" in f for f in fails)


def _feeds_at(world, length):
    from export.parity import make_feeds
    feeds = make_feeds(world["samples"][:2], h.SPEC, world["encoder"], pad_to=length)
    return {k: v[:, :length] if v.ndim == 2 else v for k, v in feeds.items()}


def _measured(ref, got, labels=None, scale=None):
    """Measurements from two fixed logit arrays through the real compare()."""
    from export.parity import _Tally, _compare, _summary
    t = _Tally()
    _compare(t, ref, got, labels or [None] * len(ref), {"batch": 0, "start": 0, "stop": len(ref), "size": len(ref), "length": 5})
    m = _summary(t, max(256, len(ref)))
    return m


def test_fp32_value_drift_fails_with_size_of_the_miss():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(300, 5)).astype(np.float32)
    fails = gate(_measured(ref, ref + 1e-3), "fp32")
    assert len(fails) == 1 and "max |logit diff| 0.001 > bound 0.0001" in fails[0]


def test_fp32_bound_scales_with_large_logits():
    ref = np.zeros((300, 5), np.float32)
    ref[:, 0] = 200.0  # logit scale 200 -> bound 2e-3
    assert gate(_measured(ref, ref + 1e-3), "fp32") == []
    assert gate(_measured(ref, ref + 5e-3), "fp32")


def test_top1_flip_fails_fp32_and_counts_disagreements():
    ref = np.tile(np.array([[1.0, 0.0]], np.float32), (300, 1))
    got = ref.copy()
    got[:3] = [[0.0, 1.0]]
    fails = gate(_measured(ref, got), "fp32", GateThresholds(fp32_atol=10.0))
    assert fails == ["top-1 agreement with torch 99.00% < 100.00% (3 of 300 samples changed class)"]
    assert gate(_measured(ref, got), "fp16") == ["top-1 agreement with torch 99.00% < 99.50% (3 of 300 samples changed class)"]


def test_int8_gate_is_about_accuracy_within_one_point():
    labels = [0] * 300
    ref = np.tile(np.array([[1.0, 0.0]], np.float32), (300, 1))
    got = ref.copy()
    got[:3] = [[0.0, 1.0]]  # 1.00 points lost: allowed
    assert gate(_measured(ref, got, labels), "int8") == []
    got[:6] = [[0.0, 1.0]]  # 2.00 points lost
    fails = gate(_measured(ref, got, labels), "int8")
    assert fails and "2.00 points below fp32's 100.00%" in fails[0]


def test_too_few_samples_and_nan_outputs_fail_every_variant():
    ref = np.ones((10, 3), np.float32)
    got = ref.copy()
    got[0, 0] = np.nan
    m = _measured(ref, got)
    m["samples"] = 10
    for variant in ("fp32", "int8", "fp16"):
        fails = gate(m, variant)
        assert any("only 10 samples" in f for f in fails)
        assert any("NaN/inf" in f for f in fails)
