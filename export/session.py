"""ONNX Runtime sessions for export checks, built from the same options that bundle.json records.

The server reads `bundle.json["session"]`; parity runs with exactly those options so the gate measures
what will be served. Torch-free.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
import onnxruntime as ort

Feeds = dict[str, np.ndarray]

_LEVELS = {
    "ORT_DISABLE_ALL": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "ORT_ENABLE_BASIC": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "ORT_ENABLE_EXTENDED": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "ORT_ENABLE_ALL": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


def session_config(variant: str) -> dict[str, Any]:
    """The session options recorded in bundle.json for a variant.

    fp16 prefers CUDA (its reason to exist) and falls back to CPU; fp32/int8 run anywhere.
    Full graph optimisation is safe for all three: parity is measured with it on.
    """
    providers = [CUDA, CPU] if variant == "fp16" else [CPU]
    return {"graph_optimization_level": "ORT_ENABLE_ALL", "preferred_providers": providers,
            "onnxruntime_version": ort.__version__}


@functools.cache
def cuda_usable() -> bool:
    """True when the CUDA provider can really start (onnxruntime-gpu lists it even without a GPU/CUDA libs).

    Probed once on a one-node graph with ORT's logger silenced, so a CPU-only machine prints no error.
    """
    if CUDA not in ort.get_available_providers():
        return False
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y"])], "probe", [x], [y])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    ort.set_default_logger_severity(4)
    try:
        session = ort.InferenceSession(model.SerializeToString(), providers=[CUDA, CPU])
        return session.get_providers()[0] == CUDA
    except Exception:
        return False
    finally:
        ort.set_default_logger_severity(2)


def usable_providers(preferred: list[str]) -> list[str]:
    """`preferred` minus providers that cannot start here; CPU is always the last resort."""
    usable = [p for p in preferred if p == CPU or (p == CUDA and cuda_usable())
              or (p not in (CUDA, CPU) and p in ort.get_available_providers())]
    return usable if CPU in usable else usable + [CPU]


def make_session(path: Path, config: dict[str, Any], providers: list[str] | None = None,
                 threads: int = 0) -> ort.InferenceSession:
    """An InferenceSession with `config`'s optimisation level on the preferred providers that work here."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = _LEVELS[config.get("graph_optimization_level", "ORT_ENABLE_ALL")]
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    wanted = providers or usable_providers(list(config.get("preferred_providers", [CPU])))
    return ort.InferenceSession(str(path), sess_options=opts, providers=wanted)


def logits_runner(session: ort.InferenceSession) -> Callable[[Feeds], np.ndarray]:
    """feeds -> logits (B, C) as float32."""
    def run(feeds: Feeds) -> np.ndarray:
        return session.run(["logits"], feeds)[0]
    return run
