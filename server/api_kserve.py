"""inference.GRPCInferenceService: the KServe v2 / Open Inference Protocol, as tritonclient speaks it.

mmkd models take BYTES inputs `image` and `text` of shape [B] or [B, 1] and return FP32 `logits` [B, C] and
BYTES `label` [B]. Inputs may come as `contents.bytes_contents` or as `raw_input_contents` (BYTES elements each
prefixed by a 4-byte little-endian length); outputs always go in `raw_output_contents`, the only place
tritonclient reads them from.
"""

from __future__ import annotations

import asyncio
import math
import struct

import grpc
import numpy as np

from server import __version__
from server._proto.kserve.v2 import grpc_service_pb2 as pb
from server._proto.kserve.v2 import grpc_service_pb2_grpc as pb_grpc
from server.engine import Engine, deadline_of
from server.errors import RequestError
from server.model import ServedModel
from server.status import status_for

API = "kserve.v2"
INPUTS = ("image", "text")
OUTPUTS = ("logits", "label")
PLATFORM = "onnxruntime_onnx"


class KServeServicer(pb_grpc.GRPCInferenceServiceServicer):
    """The subset of GRPCInferenceService that clients need to discover and infer."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    async def ServerLive(self, request, context) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context) -> pb.ServerReadyResponse:
        ready = not (self.engine.closing or self.engine.loading) and all(m.ready for m in self.engine.models)
        return pb.ServerReadyResponse(ready=ready)

    async def ModelReady(self, request, context) -> pb.ModelReadyResponse:
        try:
            model = self._model(request.name, request.version)
        except Exception as exc:  # noqa: BLE001 - mapped to a status code
            await context.abort(*status_for(exc))
        return pb.ModelReadyResponse(ready=model.ready and not self.engine.closing)

    async def ServerMetadata(self, request, context) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name="mmkd", version=__version__, extensions=["model_configuration"])

    async def ModelMetadata(self, request, context) -> pb.ModelMetadataResponse:
        try:
            model = self._model(request.name, request.version)
        except Exception as exc:  # noqa: BLE001
            await context.abort(*status_for(exc))
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=model.name, versions=[model.version], platform=PLATFORM,
            inputs=[tensor(name=n, datatype="BYTES", shape=[-1, 1]) for n in INPUTS],
            outputs=[tensor(name="logits", datatype="FP32", shape=[-1, len(model.labels)]),
                     tensor(name="label", datatype="BYTES", shape=[-1, 1])])

    async def ModelConfig(self, request, context) -> pb.ModelConfigResponse:
        try:
            model = self._model(request.name, request.version)
        except Exception as exc:  # noqa: BLE001
            await context.abort(*status_for(exc))
        s = self.engine.settings
        on_gpu = model.runner.on_gpu
        group = pb.ModelInstanceGroup(name=model.name, count=s.instances,
                                      kind=pb.ModelInstanceGroup.KIND_GPU if on_gpu else pb.ModelInstanceGroup.KIND_CPU,
                                      gpus=[model.runner.device_id] if on_gpu else [])
        config = pb.ModelConfig(
            name=model.name, platform=PLATFORM, backend="onnxruntime", max_batch_size=s.max_batch_size,
            input=[pb.ModelInput(name=n, data_type=pb.TYPE_STRING, dims=[1]) for n in INPUTS],
            output=[pb.ModelOutput(name="logits", data_type=pb.TYPE_FP32, dims=[len(model.labels)]),
                    pb.ModelOutput(name="label", data_type=pb.TYPE_STRING, dims=[1])],
            instance_group=[group],
            dynamic_batching=pb.ModelDynamicBatching(
                preferred_batch_size=[s.max_batch_size],
                max_queue_delay_microseconds=int(s.max_queue_delay_ms * 1000)),
            parameters={"provider": pb.ModelParameter(string_value=model.provider),
                        "variant": pb.ModelParameter(string_value=model.spec.variant),
                        "labels": pb.ModelParameter(string_value=",".join(model.labels))})
        return pb.ModelConfigResponse(config=config)

    async def ModelInfer(self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
                         ) -> pb.ModelInferResponse:
        try:
            return await self._infer(request, deadline_of(context))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - mapped to a status code
            await context.abort(*status_for(exc))

    def _model(self, name: str, version: str) -> ServedModel:
        if not name:
            raise RequestError("name", "is empty; name a served model")
        model = self.engine.model(name)
        if version and version != model.version:
            raise RequestError("version", f"{version!r} is not served; model {name} serves version {model.version}")
        return model

    async def _infer(self, request: pb.ModelInferRequest, deadline: float | None) -> pb.ModelInferResponse:
        label = request.model_name if request.model_name in self.engine.models else "_unknown"
        with self.engine.track(label, API):
            if not request.model_name:
                raise RequestError("model_name", "is empty; name a served model")
            model = self._model(request.model_name, request.model_version)
            images, texts = read_inputs(request, self.engine.settings.max_batch_size)
            outputs = requested_outputs(request)
            answers = await self._run_all(model, images, texts, deadline)
            return build_response(request, model, np.stack([a.logits for a in answers]), outputs)

    async def _run_all(self, model: ServedModel, images: list[bytes], texts: list[str], deadline: float | None):
        if len(images) == 1:  # the common case: no task and gather to wait on (two event-loop turns fewer)
            return [await self.engine.infer(model, images[0], texts[0], deadline=deadline)]
        tasks = [asyncio.ensure_future(self.engine.infer(model, img, txt, deadline=deadline, index=i))
                 for i, (img, txt) in enumerate(zip(images, texts))]
        try:
            return await asyncio.gather(*tasks)
        finally:
            for task in tasks:  # first failure fails the request: stop the rest
                task.cancel()


def read_inputs(request: pb.ModelInferRequest, max_batch: int) -> tuple[list[bytes], list[str]]:
    """Validate names, datatypes, shapes and BYTES framing; return the images and decoded texts."""
    names = [t.name for t in request.inputs]
    unknown = [n for n in names if n not in INPUTS]
    if unknown:
        raise RequestError("inputs", f"unknown input {unknown[0]!r}; this model takes BYTES inputs 'image' and 'text'")
    missing = [n for n in INPUTS if n not in names]
    if missing or len(names) != len(set(names)):
        raise RequestError("inputs", f"need exactly one 'image' and one 'text' input, got {names}")
    if request.raw_input_contents and len(request.raw_input_contents) != len(request.inputs):
        raise RequestError("raw_input_contents", f"has {len(request.raw_input_contents)} entries for "
                           f"{len(request.inputs)} inputs")
    values: dict[str, list[bytes]] = {}
    for i, tensor in enumerate(request.inputs):
        field = f"inputs[{tensor.name}]"
        if tensor.datatype != "BYTES":
            raise RequestError(field, f"datatype is {tensor.datatype!r}; expected 'BYTES'")
        count = _batch_of(field, list(tensor.shape), max_batch)
        raw = request.raw_input_contents[i] if request.raw_input_contents else None
        elements = unframe_bytes(raw, field) if raw is not None else list(tensor.contents.bytes_contents)
        if len(elements) != count:
            raise RequestError(field, f"shape {list(tensor.shape)} holds {count} elements but "
                                      f"{len(elements)} were sent")
        values[tensor.name] = elements
    if len(values["image"]) != len(values["text"]):
        raise RequestError("inputs", f"'image' has {len(values['image'])} elements, 'text' {len(values['text'])}")
    return values["image"], [_utf8(t, f"inputs[text][{j}]") for j, t in enumerate(values["text"])]


def _batch_of(field: str, shape: list[int], max_batch: int) -> int:
    if len(shape) not in (1, 2) or (len(shape) == 2 and shape[1] != 1) or any(d < 1 for d in shape):
        raise RequestError(field, f"shape {shape} is not accepted; send [B] or [B, 1] with B >= 1")
    if shape[0] > max_batch:
        raise RequestError(field, f"batch {shape[0]} exceeds max_batch_size {max_batch}")
    return math.prod(shape)


def _utf8(data: bytes, field: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RequestError(field, f"is not valid UTF-8 ({exc.reason} at byte {exc.start})") from None


def unframe_bytes(raw: bytes, field: str) -> list[bytes]:
    """Split a raw BYTES tensor: each element is a 4-byte little-endian length, then that many bytes."""
    out, pos = [], 0
    while pos < len(raw):
        if pos + 4 > len(raw):
            raise RequestError(field, f"BYTES framing broken at offset {pos}: fewer than 4 length bytes left")
        (size,) = struct.unpack_from("<I", raw, pos)
        pos += 4
        if pos + size > len(raw):
            raise RequestError(field, f"BYTES element at offset {pos - 4} declares {size} bytes, "
                               f"only {len(raw) - pos} remain")
        out.append(raw[pos:pos + size])
        pos += size
    return out


def frame_bytes(elements: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


def requested_outputs(request: pb.ModelInferRequest) -> list[str]:
    names = [o.name for o in request.outputs] or list(OUTPUTS)
    unknown = [n for n in names if n not in OUTPUTS]
    if unknown:
        raise RequestError("outputs", f"unknown output {unknown[0]!r}; this model has outputs {list(OUTPUTS)}")
    return names


def build_response(request: pb.ModelInferRequest, model: ServedModel, logits: np.ndarray,
                   outputs: list[str]) -> pb.ModelInferResponse:
    """logits (B, C) -> response with each requested output in raw_output_contents."""
    response = pb.ModelInferResponse(model_name=model.name, model_version=model.version, id=request.id)
    batch = logits.shape[0]
    for name in outputs:
        if name == "logits":
            response.outputs.add(name=name, datatype="FP32", shape=list(logits.shape))
            response.raw_output_contents.append(logits.astype("<f4").tobytes())
        else:
            labels = [model.labels[int(i)].encode() for i in logits.argmax(axis=-1)]
            response.outputs.add(name=name, datatype="BYTES", shape=[batch, 1])
            response.raw_output_contents.append(frame_bytes(labels))
    return response
