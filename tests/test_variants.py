"""int8 and fp16 variants: produced from the dynamo graph, float32 at the boundary, gated, smaller."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from export.api import bundle_model
from export.bundle import TextEncoder, load_bundle
from export.onnx_export import check_onnx, export_onnx
from export.parity import make_feeds
from export.session import cuda_usable, logits_runner, make_session, session_config
from export.variants import convert_fp16, quantize_int8

import export_helpers as h


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("variants")
    fp32 = tmp / "fp32.onnx"
    export_onnx(h.tiny_model(), fp32, image_size=h.SPEC.image_size, vocab_size=h.vocab_size())
    tok = h.write_tokenizer(tmp / "tokenizer.json")
    feeds = make_feeds(h.make_samples(9, seed=3), h.SPEC, TextEncoder(tok, h.SPEC))
    return {"tmp": tmp, "fp32": fp32, "tok": tok, "feeds": feeds}


def _logits(path, variant, feeds):
    return logits_runner(make_session(path, session_config(variant)))(feeds)


def _op_types(path):
    return {n.op_type for n in onnx.load(str(path)).graph.node}


def test_int8_dynamic_quantizes_linears_of_a_dynamo_graph(world):
    """quantize_dynamic rejects the dynamo graph's stale value_info; quantize_int8 strips it first."""
    out = world["tmp"] / "int8.onnx"
    recipe = quantize_int8(world["fp32"], out)
    assert recipe["method"] == "dynamic" and not recipe["static_convs"]
    check_onnx(out)
    assert "DynamicQuantizeLinear" in _op_types(out) or "MatMulInteger" in _op_types(out)
    assert out.stat().st_size < world["fp32"].stat().st_size
    ref, got = _logits(world["fp32"], "fp32", world["feeds"]), _logits(out, "int8", world["feeds"])
    assert np.abs(ref - got).max() < 0.05 * np.abs(ref).max() + 1e-3


def test_int8_static_convs_with_calibration(world):
    out = world["tmp"] / "int8s.onnx"
    recipe = quantize_int8(world["fp32"], out, calibration=[world["feeds"]])
    assert recipe["static_convs"] and recipe["calibration_batches"] == 1
    check_onnx(out)
    assert "QuantizeLinear" in _op_types(out)
    assert _logits(out, "int8", world["feeds"]).shape == (9, len(h.LABELS))


def test_fp16_keeps_float32_boundary_and_runs_on_cpu(world):
    out = world["tmp"] / "fp16.onnx"
    convert_fp16(world["fp32"], out)
    model = check_onnx(out)  # also proves the boundary Casts were sorted into place
    types = {v.name: v.type.tensor_type.elem_type for v in [*model.graph.input, *model.graph.output]}
    assert types["pixel_values"] == types["logits"] == onnx.TensorProto.FLOAT
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer)
    ref, got = _logits(world["fp32"], "fp32", world["feeds"]), _logits(out, "fp16", world["feeds"])
    assert got.dtype == np.float32
    assert (ref.argmax(1) == got.argmax(1)).all() and np.abs(ref - got).max() < 1e-2


@pytest.mark.parametrize("variant", ["int8", "fp16"])
def test_variant_bundle_passes_gate_and_reports_size_and_speed(world, variant):
    out = bundle_model(h.tiny_model(), world["tmp"] / variant, name=f"tiny-{variant}", labels=h.LABELS,
                       spec=h.SPEC, tokenizer=world["tok"], samples=h.make_samples(256), variant=variant)
    bundle = load_bundle(out)
    assert bundle.spec.variant == variant
    parity = json.loads(bundle.file("parity.json").read_text())
    assert parity["passed"] and set(parity["results"]) == {"fp32", variant}
    assert parity["results"]["fp32"]["max_abs_diff"] <= 1e-4  # the base graph is gated too
    result = parity["results"][variant]
    if variant == "fp16":
        assert result["top1_agreement"] >= 0.995
        assert bundle.spec.session["preferred_providers"][0] == "CUDAExecutionProvider"
    else:
        assert result["accuracy"]["onnx"] >= parity["results"]["fp32"]["accuracy"]["onnx"] - 0.01
    assert parity["size_bytes"][variant] < parity["size_bytes"]["fp32"]
    for size in ("batch_1", "batch_64"):
        assert set(parity["latency_ms_cpu"][size]) == {"fp32", variant}
    assert bundle.spec.provenance["variant_recipe"]["method"] != "none"


@pytest.mark.gpu
@pytest.mark.skipif(not cuda_usable(), reason="needs a working ONNX Runtime CUDA provider")
def test_fp16_parity_on_cuda(world):
    """Where a GPU is present the fp16 gate runs on CUDA, the provider the variant is for."""
    out = bundle_model(h.tiny_model(), world["tmp"] / "fp16-cuda", name="tiny-fp16", labels=h.LABELS,
                       spec=h.SPEC, tokenizer=world["tok"], samples=h.make_samples(256), variant="fp16")
    result = json.loads(load_bundle(out).file("parity.json").read_text())["results"]["fp16"]
    assert result["provider"] == "CUDAExecutionProvider" and result["top1_agreement"] >= 0.995
