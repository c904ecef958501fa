"""ONNX Runtime sessions: pick the execution provider, verify what the session really got, run batches.

Why verify: the onnxruntime-gpu wheel lists CUDAExecutionProvider as available even on machines without CUDA and
then silently builds a CPU session. The provider in use is therefore read back from `session.get_providers()`,
never assumed from what was asked for. On CUDA, inputs are bound with IOBinding so ORT copies each input to the
device once and no per-run allocation of outputs is re-negotiated.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from server.errors import ConfigError, ModelLoadError

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
log = logging.getLogger("mmkd.server.runtime")

_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
              "tensor(int32)": np.int32, "tensor(double)": np.float64}


_LEVELS = ("ORT_DISABLE_ALL", "ORT_ENABLE_BASIC", "ORT_ENABLE_EXTENDED", "ORT_ENABLE_ALL")


@dataclass(frozen=True)
class Device:
    """A parsed --device value: kind is "auto", "cpu" or "cuda"; index is the CUDA device id."""

    kind: str
    index: int = 0

    @property
    def wants_gpu(self) -> bool:
        return self.kind in ("auto", "cuda")


def parse_device(text: str) -> Device:
    """'auto' | 'cpu' | 'cuda' | 'cuda:N' -> Device."""
    if text in ("auto", "cpu", "cuda"):
        return Device(text)
    if text.startswith("cuda:") and text[5:].isdigit():
        return Device("cuda", int(text[5:]))
    raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {text!r}")


def optimization_level(name: str) -> ort.GraphOptimizationLevel:
    """bundle.json's session.graph_optimization_level (the level parity was measured with) -> ORT's enum."""
    if name not in _LEVELS:
        raise ModelLoadError(f"bundle session.graph_optimization_level {name!r} is not one of {sorted(_LEVELS)}")
    return getattr(ort.GraphOptimizationLevel, name)


def provider_chain(device: Device, available: Sequence[str]) -> list[tuple[str, dict[str, Any]]]:
    """The providers to ask ORT for, best first; CPU always closes the chain so a session can be built."""
    if device.kind == "cpu":
        return [(CPU, {})]
    if CUDA in available:
        return [(CUDA, {"device_id": device.index}), (CPU, {})]
    if device.kind == "cuda":
        raise ModelLoadError(f"--device {device.kind}:{device.index} asked for CUDA, but this onnxruntime build has "
                             f"no CUDAExecutionProvider (available: {list(available)}); install onnxruntime-gpu "
                             f"or use --device cpu")
    return [(CPU, {})]


class OrtRunner:
    """One ORT session for one model file; `run` is thread-safe (ORT sessions allow concurrent runs)."""

    def __init__(self, model_path: Path, device: Device, *, intra_op_threads: int = 0, spinning: bool = True,
                 graph_optimization_level: str = "ORT_ENABLE_ALL") -> None:
        options = ort.SessionOptions()
        options.graph_optimization_level = optimization_level(graph_optimization_level)
        if intra_op_threads:
            options.intra_op_num_threads = intra_op_threads
        # ORT's intra-op workers spin after each run waiting for the next; in a server they spin on cores the
        # event loop and the other requests need (see server/README.md for the measurement).
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        chain = provider_chain(device, ort.get_available_providers())
        try:
            self.session = ort.InferenceSession(str(model_path), sess_options=options,
                                                providers=[name for name, _ in chain],
                                                provider_options=[opts for _, opts in chain])
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph types and RuntimeError
            raise ModelLoadError(f"ONNX Runtime cannot load {model_path}: {exc}") from exc
        self.provider = self.session.get_providers()[0]
        if device.kind == "cuda" and self.provider != CUDA:
            raise ModelLoadError(
                f"--device cuda:{device.index} asked for CUDA but the session fell back to {self.provider} "
                f"(CUDA libraries or a GPU are missing); use --device auto to allow CPU or --device cpu")
        self.device_id = device.index if self.provider == CUDA else -1
        self.input_types = {i.name: _ORT_TYPES.get(i.type) for i in self.session.get_inputs()}
        self.output_names = [o.name for o in self.session.get_outputs()]

    @property
    def on_gpu(self) -> bool:
        return self.provider == CUDA

    @property
    def placed(self) -> Device:
        """The device this session really got. A copy of the model elsewhere (a model process) is pinned to it:
        under `--device auto` the copy could otherwise fall back to CPU alone, say when the GPU is out of memory,
        and serve some batches orders of magnitude slower without a word; pinned, it fails to start instead."""
        return Device("cuda", self.device_id) if self.on_gpu else Device("cpu")

    def run(self, feeds: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Run one batch; inputs are cast to the graph's declared types (an fp16 graph may take fp16 pixels).

        `outputs` names the outputs to fetch (default: all); the server asks only for logits, so ORT neither
        copies out nor (on CUDA) transfers the embeddings nobody reads."""
        names = list(outputs) if outputs is not None else self.output_names
        cast = {name: self._cast(name, array) for name, array in feeds.items()}
        if self.on_gpu:
            results = self._run_iobinding(cast, names)
        else:
            results = self.session.run(names, cast)
        return {name: np.asarray(out) for name, out in zip(names, results)}

    def _cast(self, name: str, array: np.ndarray) -> np.ndarray:
        want = self.input_types.get(name)
        return array if want is None or array.dtype == want else array.astype(want)

    def _run_iobinding(self, feeds: Mapping[str, np.ndarray], names: Sequence[str]) -> list[np.ndarray]:
        binding = self.session.io_binding()
        for name, array in feeds.items():
            value = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), "cuda", self.device_id)
            binding.bind_ortvalue_input(name, value)
        for name in names:
            binding.bind_output(name, "cuda", self.device_id)
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()

    def describe(self) -> dict[str, Any]:
        return {"provider": self.provider, "device_id": self.device_id,
                "inputs": {i.name: [i.type, i.shape] for i in self.session.get_inputs()},
                "outputs": {o.name: [o.type, o.shape] for o in self.session.get_outputs()}}
