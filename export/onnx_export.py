"""torch -> ONNX for the bundle contract: fixed tensor names, dynamic batch and sequence axes, one file.

Why the dynamo exporter (`torch.onnx.export(..., dynamo=True)`), measured with torch 2.13:
- the legacy TorchScript exporter traces `nn.MultiheadAttention` with the example's sequence length
  baked into its Reshape nodes: a graph exported at L=16 declares a symbolic `sequence` axis yet fails
  in ONNX Runtime at L=48. The dynamo exporter keeps the length symbolic (torch.export `Dim`s).
- the dynamo exporter needs `onnxscript` (a declared dependency) and, by default, writes weights as
  external data next to the graph; the bundle must be a single `model.onnx`, so we pass
  `external_data=False` (fine below protobuf's 2 GiB limit; larger models fail loudly here).
- its graph carries `value_info` entries that go stale after rewrites; `variants.py` strips them
  before quantization (see `strip_value_info`).

Heavy imports (torch, onnx) are at module level on purpose: this module is the torch side of export/.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import nn

from export.errors import ExportCheckError, ExportError, ExportValidationError

INPUT_NAMES: tuple[str, ...] = ("pixel_values", "input_ids", "attention_mask")
LOGITS = "logits"
BATCH_AXIS = "batch"
SEQUENCE_AXIS = "sequence"
MIN_OPSET = 18  # the dynamo exporter's lowest native opset (torch 2.13 defaults to 20)

_INPUT_DTYPES = {
    "pixel_values": onnx.TensorProto.FLOAT,
    "input_ids": onnx.TensorProto.INT64,
    "attention_mask": onnx.TensorProto.INT64,
}


def _field(out: Any, name: str) -> Any:
    """Read one named output from a tensor, a mapping (HF ModelOutput) or an object with attributes."""
    if isinstance(out, torch.Tensor):
        if name != LOGITS:
            raise ExportError(f"model returned a bare tensor; it has no output named {name!r}")
        return out
    if isinstance(out, Mapping):
        return out[name]
    return getattr(out, name)


def _named_tensors(out: Any) -> dict[str, torch.Tensor]:
    """All tensor fields of a model output, in declaration order."""
    if isinstance(out, torch.Tensor):
        return {LOGITS: out}
    if isinstance(out, Mapping):
        items = out.items()
    elif hasattr(out, "_asdict"):  # NamedTuple (distill's MultimodalOutput)
        items = out._asdict().items()
    elif hasattr(out, "__dataclass_fields__"):
        items = ((k, getattr(out, k)) for k in out.__dataclass_fields__)
    else:
        items = vars(out).items()
    return {k: v for k, v in items if isinstance(v, torch.Tensor)}


def discover_outputs(model: nn.Module, example: tuple[torch.Tensor, ...]) -> list[str]:
    """Graph outputs: `logits` first, then every other (B, D) tensor the model returns (embeddings).

    Sequence-shaped tensors (hidden states) are left out: the server never reads them and they
    would make every response larger.
    """
    with torch.no_grad():
        tensors = _named_tensors(model(*example))
    if LOGITS not in tensors:
        raise ExportError(f"model output has no `logits` tensor (found {sorted(tensors)})")
    batch = example[0].shape[0]
    extras = [k for k, v in tensors.items() if k != LOGITS and v.dim() == 2 and v.shape[0] == batch]
    return [LOGITS, *extras]


class GraphModule(nn.Module):
    """Wraps a model so its forward returns a flat tuple in `output_names` order (what ONNX needs)."""

    def __init__(self, model: nn.Module, output_names: Sequence[str]) -> None:
        super().__init__()
        self.model = model
        self.output_names = list(output_names)

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model(pixel_values, input_ids, attention_mask)
        return tuple(_field(out, name) for name in self.output_names)


def example_inputs(image_size: int, vocab_size: int, batch: int = 2,
                   length: int = 11) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Seeded example inputs. batch=2 and an odd length avoid torch.export's 0/1 specialisation
    and accidental equality with other dims (which would merge the symbolic axes)."""
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(batch, 3, image_size, image_size, generator=g)  # (B, 3, H, W)
    ids = torch.randint(1, max(2, vocab_size), (batch, length), generator=g)  # (B, L)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1, length - 3:] = 0  # one padded row, so masking paths are traced too
    return pixels, ids, mask


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence the exporter's progress prints and its known-harmless notices (axis renames, missing
    torchvision ops), keeping real warnings."""
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.filterwarnings("ignore", message=r".*axis name: .* will not be used")
            warnings.filterwarnings("ignore", message=r".*LeafSpec.*", category=FutureWarning)
            yield
    finally:
        registration.setLevel(level)


def export_onnx(model: nn.Module, out_path: Path, *, image_size: int, vocab_size: int,
                opset: int | None = None, example_length: int = 11) -> list[str]:
    """Export `model` (forward(pixel_values, input_ids, attention_mask)) to one ONNX file.

    Returns the graph's output names. The file is written atomically. Raises ExportError when
    torch cannot export the model (the message keeps torch's reason).
    """
    if opset is not None and opset < MIN_OPSET:
        raise ExportError(f"opset {opset} is not supported: the dynamo exporter emits opset >= {MIN_OPSET} "
                          f"(its down-conversion to {opset} fails or silently keeps {MIN_OPSET}); use --opset {MIN_OPSET} or later")
    model = model.eval()
    example = example_inputs(image_size, vocab_size, length=example_length)
    names = discover_outputs(model, example)
    batch, seq = torch.export.Dim(BATCH_AXIS), torch.export.Dim(SEQUENCE_AXIS)
    dynamic = {"pixel_values": {0: batch}, "input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}}
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".export-", suffix=".onnx", dir=out_path.parent)
    os.close(fd)
    try:
        with _quiet_exporter():
            torch.onnx.export(
                GraphModule(model, names).eval(), example, tmp, dynamo=True, external_data=False,
                input_names=list(INPUT_NAMES), output_names=names, dynamic_shapes=dynamic,
                opset_version=opset, optimize=True, verbose=False)
        _check_opset(tmp, opset)
        onnx.save_model(strip_debug_metadata(onnx.load(tmp)), tmp, save_as_external_data=False)
        os.replace(tmp, out_path)
    except ExportError:
        raise
    except Exception as exc:
        raise ExportError(f"torch.onnx.export (dynamo) failed: {type(exc).__name__}: {exc}") from exc
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return names


def strip_debug_metadata(model: onnx.ModelProto) -> onnx.ModelProto:
    """Drop the per-node torch provenance (FX node text, module stacks) the dynamo exporter attaches.

    It is debugging detail that made up ~2/3 of a small model's file (288 kB -> 104 kB for the tiny
    FiLM teacher) and would skew the size numbers reported for int8/fp16.
    """
    for node in model.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    return model


def _check_opset(path: str, wanted: int | None) -> None:
    if wanted is None:
        return
    got = next((o.version for o in onnx.load(path, load_external_data=False).opset_import if o.domain in ("", "ai.onnx")), None)
    if got != wanted:
        raise ExportError(f"asked for opset {wanted} but the exporter produced opset {got}")


def check_onnx(path: Path) -> onnx.ModelProto:
    """Run the ONNX checker with full shape inference; return the loaded model."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:  # onnx raises ValidationError / InferenceError
        raise ExportCheckError(f"onnx.checker rejected {path}: {exc}") from exc
    return onnx.load(str(path))


def _dims(value: onnx.ValueInfoProto) -> list[str | int]:
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


def _check_value(v: onnx.ValueInfoProto, dtype: int, want: list[str | int]) -> list[str]:
    """Compare one graph input/output with its contract: dtype, rank, fixed dims, symbolic dims."""
    problems = []
    got_type = v.type.tensor_type.elem_type
    if got_type != dtype:
        problems.append(f"{v.name}: dtype {onnx.TensorProto.DataType.Name(got_type)}, "
                        f"expected {onnx.TensorProto.DataType.Name(dtype)}")
    dims = _dims(v)
    if len(dims) != len(want):
        return problems + [f"{v.name}: rank {len(dims)} {dims}, expected rank {len(want)} {want}"]
    for axis, (got, exp) in enumerate(zip(dims, want)):
        if isinstance(exp, str) and not isinstance(got, str):
            problems.append(f"{v.name}: axis {axis} is fixed at {got}, expected dynamic ({exp})")
        elif isinstance(exp, int) and got != exp:
            problems.append(f"{v.name}: axis {axis} is {got!r}, expected {exp}")
    return problems


def validate_graph(model: onnx.ModelProto, *, image_size: int, num_labels: int,
                   output_names: Sequence[str]) -> None:
    """Names, then dtypes and shapes, against the bundle contract. Collects every miss, then raises
    ExportValidationError. (Values are the parity gate's job.)"""
    inputs = {v.name: v for v in model.graph.input}
    outputs = {v.name: v for v in model.graph.output}
    problems = []
    if sorted(inputs) != sorted(INPUT_NAMES):
        problems.append(f"inputs are {sorted(inputs)}, expected {sorted(INPUT_NAMES)}")
    if [v.name for v in model.graph.output] != list(output_names):
        problems.append(f"outputs are {[v.name for v in model.graph.output]}, expected {list(output_names)}")
    if problems:
        raise ExportValidationError(problems)
    want_in = {"pixel_values": [BATCH_AXIS, 3, image_size, image_size],
               "input_ids": [BATCH_AXIS, SEQUENCE_AXIS], "attention_mask": [BATCH_AXIS, SEQUENCE_AXIS]}
    for name, want in want_in.items():
        problems += _check_value(inputs[name], _INPUT_DTYPES[name], want)
    problems += _check_value(outputs[LOGITS], onnx.TensorProto.FLOAT, [BATCH_AXIS, num_labels])
    for name in output_names[1:]:
        dims = _dims(outputs[name])
        if not dims or isinstance(dims[0], int):
            problems.append(f"{name}: axis 0 is {dims[:1]}, expected dynamic ({BATCH_AXIS})")
    if problems:
        raise ExportValidationError(problems)


def graph_axes(model: onnx.ModelProto) -> dict[str, list[str | int]]:
    """Every graph input and output with its dims, for bundle.json / parity.json."""
    return {v.name: _dims(v) for v in [*model.graph.input, *model.graph.output]}
