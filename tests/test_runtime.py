"""ONNX Runtime provider selection: CUDA only when the session really got it, CPU fallback, variant choice,
and (on a GPU machine) the CUDA provider with IOBinding giving the CPU's answers."""

from __future__ import annotations

import functools
import shutil

import numpy as np
import onnxruntime as ort
import pytest

from export.bundle import InputLimits
from server.errors import ConfigError, ModelLoadError
from server.model import discover, load_model
from server.runtime import CPU, CUDA, Device, OrtRunner, parse_device, provider_chain
from tiny_bundle import build_tiny_bundle


@functools.lru_cache(maxsize=1)
def cuda_really_works() -> bool:
    """Build a session and read back what it got: the wheel lists CUDA even where it cannot load."""
    if CUDA not in ort.get_available_providers():
        return False
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        bundle = build_tiny_bundle(Path(tmp) / "b")
        session = ort.InferenceSession(str(bundle / "model.onnx"), providers=[CUDA, CPU])
        return session.get_providers()[0] == CUDA


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory):
    return build_tiny_bundle(tmp_path_factory.mktemp("b") / "tiny")


@pytest.mark.parametrize("text,expected", [("auto", Device("auto")), ("cpu", Device("cpu")),
                                           ("cuda", Device("cuda", 0)), ("cuda:3", Device("cuda", 3))])
def test_parse_device(text, expected):
    assert parse_device(text) == expected


@pytest.mark.parametrize("bad", ["gpu", "cuda:", "cuda:x", "CPU", ""])
def test_parse_device_rejects_unknown_values(bad):
    with pytest.raises(ConfigError, match="auto, cpu, cuda or cuda:N"):
        parse_device(bad)


def test_provider_chain():
    with_cuda = [CUDA, CPU]
    assert provider_chain(Device("cpu"), with_cuda) == [(CPU, {})]
    assert provider_chain(Device("auto"), with_cuda) == [(CUDA, {"device_id": 0}), (CPU, {})]
    assert provider_chain(Device("cuda", 2), with_cuda) == [(CUDA, {"device_id": 2}), (CPU, {})]
    assert provider_chain(Device("auto"), [CPU]) == [(CPU, {})]
    with pytest.raises(ModelLoadError, match="no CUDAExecutionProvider"):
        provider_chain(Device("cuda"), [CPU])


def test_cpu_runner_reports_cpu_and_runs_a_batch(bundle_dir):
    runner = OrtRunner(bundle_dir / "model.onnx", Device("cpu"))
    assert runner.provider == CPU and runner.device_id == -1 and not runner.on_gpu
    out = runner.run({"pixel_values": np.zeros((3, 3, 16, 16), np.float32),
                      "input_ids": np.ones((3, 4), np.int64), "attention_mask": np.ones((3, 4), np.int64)})
    assert out["logits"].shape == (3, 5)
    quiet = OrtRunner(bundle_dir / "model.onnx", Device("cpu"), intra_op_threads=2, spinning=False)
    options = quiet.session.get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert np.array_equal(quiet.run({"pixel_values": np.zeros((3, 3, 16, 16), np.float32),
                                     "input_ids": np.ones((3, 4), np.int64),
                                     "attention_mask": np.ones((3, 4), np.int64)})["logits"], out["logits"])


def test_runner_fetches_only_the_outputs_asked_for(tmp_path):
    """The server asks for logits alone; embeddings it never reads are not copied out."""
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, ["batch", 3])
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", 3]) for n in ("logits", "image_embed")]
    graph = helper.make_graph([helper.make_node("Relu", ["pixel_values"], ["logits"]),
                               helper.make_node("Neg", ["pixel_values"], ["image_embed"])], "two", [x], outs)
    path = tmp_path / "two.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)
    runner = OrtRunner(path, Device("cpu"))
    feeds = {"pixel_values": np.array([[-1.0, 0.5, 2.0]], np.float32)}
    assert sorted(runner.run(feeds)) == ["image_embed", "logits"]
    only = runner.run(feeds, outputs=("logits",))
    assert list(only) == ["logits"] and np.array_equal(only["logits"], [[0.0, 0.5, 2.0]])


@pytest.mark.skipif(cuda_really_works(), reason="this machine has a working CUDA provider")
def test_auto_falls_back_to_cpu_and_reports_what_the_session_really_got(bundle_dir):
    runner = OrtRunner(bundle_dir / "model.onnx", Device("auto"))
    assert runner.provider == CPU and runner.device_id == -1
    assert runner.placed == Device("cpu")  # what a model process is pinned to: never "auto" again


@pytest.mark.skipif(cuda_really_works(), reason="this machine has a working CUDA provider")
def test_explicit_cuda_without_a_working_cuda_fails_loudly(bundle_dir):
    with pytest.raises(ModelLoadError, match="--device cpu"):
        OrtRunner(bundle_dir / "model.onnx", Device("cuda"))


def test_model_folder_with_variants_serves_fp32_on_cpu(tmp_path, bundle_dir):
    folder = tmp_path / "repo" / "multi"
    folder.mkdir(parents=True)
    build_tiny_bundle(folder / "fp16", name="multi", variant="fp16")
    build_tiny_bundle(folder / "int8", name="multi", variant="int8")
    shutil.copytree(bundle_dir, folder / "fp32")
    (tmp_path / "repo" / ".hidden-tmp").mkdir()
    assert list(discover(tmp_path / "repo")) == ["multi"]
    model = load_model("multi", folder, Device("cpu"), InputLimits(), max_batch_size=4)
    assert model.spec.variant == "fp32" and model.provider == CPU and model.ready


def test_int8_is_the_cpu_fallback_when_there_is_no_fp32(tmp_path):
    folder = tmp_path / "m"
    build_tiny_bundle(folder / "a", name="m", variant="fp16")
    build_tiny_bundle(folder / "b", name="m", variant="int8")
    assert load_model("m", folder, Device("cpu"), InputLimits()).spec.variant == "int8"


def test_tampered_bundle_is_refused_with_a_message(tmp_path, bundle_dir):
    folder = tmp_path / "bad"
    shutil.copytree(bundle_dir, folder)
    with open(folder / "model.onnx", "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(ModelLoadError, match="sha256"):
        load_model("bad", folder, Device("cpu"), InputLimits())


@pytest.mark.gpu
@pytest.mark.skipif(not cuda_really_works(), reason="needs a working ONNX Runtime CUDA provider")
def test_cuda_provider_with_iobinding_matches_cpu(bundle_dir):
    gpu = OrtRunner(bundle_dir / "model.onnx", Device("cuda", 0))
    cpu = OrtRunner(bundle_dir / "model.onnx", Device("cpu"))
    assert gpu.provider == CUDA and gpu.device_id == 0 and gpu.on_gpu and gpu.placed == Device("cuda", 0)
    rng = np.random.default_rng(0)
    feeds = {"pixel_values": rng.standard_normal((8, 3, 16, 16)).astype(np.float32),
             "input_ids": rng.integers(2, 10, (8, 6)).astype(np.int64), "attention_mask": np.ones((8, 6), np.int64)}
    np.testing.assert_allclose(gpu.run(feeds)["logits"], cpu.run(feeds)["logits"], atol=1e-4)
