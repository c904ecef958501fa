"""mmkd.v1.Inference: Classify, ClassifyStream, ListModels, GetModel."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import grpc

from server._proto.mmkd.v1 import inference_pb2 as pb
from server._proto.mmkd.v1 import inference_pb2_grpc as pb_grpc
from server.engine import Answer, Engine, deadline_of
from server.errors import RequestError
from server.model import ServedModel, softmax, top_k
from server.status import status_for

API = "mmkd.v1"
DEFAULT_TOP_K = 5
log = logging.getLogger("mmkd.server.api_v1")


class InferenceServicer(pb_grpc.InferenceServicer):
    """The own API; errors leave through `context.abort(code, message)`."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    async def Classify(self, request: pb.ClassifyRequest, context: grpc.aio.ServicerContext) -> pb.ClassifyResponse:
        try:
            return await self._classify(request, deadline_of(context))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - mapped to a status code
            code, message = status_for(exc)
            await context.abort(code, message)

    async def ClassifyStream(self, request_iterator: AsyncIterator[pb.ClassifyRequest],
                             context: grpc.aio.ServicerContext) -> AsyncIterator[pb.ClassifyStreamResponse]:
        """Start every request as it arrives (so they batch together) and answer in request order."""
        answers: asyncio.Queue[asyncio.Task | None] = asyncio.Queue(maxsize=self.engine.settings.max_queue_size)
        started: set[asyncio.Task] = set()

        async def read() -> None:
            try:
                async for request in request_iterator:
                    task = asyncio.create_task(self._stream_item(request, deadline_of(context)))
                    started.add(task)
                    task.add_done_callback(started.discard)
                    await answers.put(task)  # blocks when the client reads slower than it writes: backpressure
            finally:
                await answers.put(None)

        reader = asyncio.create_task(read())
        try:
            while (task := await answers.get()) is not None:
                yield await task
            await reader
        finally:  # the client went away or the stream ended: stop reading and drop unanswered requests
            reader.cancel()
            for task in list(started):
                task.cancel()

    async def _stream_item(self, request: pb.ClassifyRequest, deadline: float | None) -> pb.ClassifyStreamResponse:
        try:
            response = await self._classify(request, deadline)
            return pb.ClassifyStreamResponse(request_id=request.request_id, response=response)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - reported in-stream, the stream goes on
            code, message = status_for(exc)
            return pb.ClassifyStreamResponse(request_id=request.request_id,
                                             error=pb.StreamError(code=code.value[0], message=message))

    async def _classify(self, request: pb.ClassifyRequest, deadline: float | None) -> pb.ClassifyResponse:
        label = request.model if request.model in self.engine.models else "_unknown"
        with self.engine.track(label, API):
            if not request.model:
                raise RequestError("model", "is empty; name one of the served models (ListModels)")
            model = self.engine.model(request.model)
            answer = await self.engine.infer(model, request.image, request.text, deadline=deadline)
            return classify_response(model, answer, request.top_k or DEFAULT_TOP_K, request.request_id)

    async def ListModels(self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
                         ) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=[self._info(m) for m in self.engine.models])

    async def GetModel(self, request: pb.GetModelRequest, context: grpc.aio.ServicerContext) -> pb.ModelInfo:
        try:
            return self._info(self.engine.model(request.name))
        except Exception as exc:  # noqa: BLE001 - mapped to a status code
            await context.abort(*status_for(exc))

    def _info(self, model: ServedModel) -> pb.ModelInfo:
        s, p = self.engine.settings, model.spec.preprocess
        return pb.ModelInfo(
            name=model.name, version=model.version, task=model.spec.task, labels=list(model.labels),
            variant=model.spec.variant, provider=model.provider, device_id=model.runner.device_id,
            ready=model.ready and not self.engine.closing, max_batch_size=s.max_batch_size,
            max_queue_delay_ms=s.max_queue_delay_ms, instances=s.instances,
            preprocess=pb.Preprocess(image_size=p.image_size, resample=p.resample, mean=p.mean, std=p.std,
                                     channel_order=p.channel_order, max_text_length=p.max_text_length,
                                     lowercase=p.lowercase),
            provenance={str(k): str(v) for k, v in model.spec.provenance.items()})


def classify_response(model: ServedModel, answer: Answer, k: int, request_id: str) -> pb.ClassifyResponse:
    """Softmax, top-k and timings into the wire message."""
    probs = softmax(answer.logits)
    best = top_k(probs, k)
    ms = 1000.0
    return pb.ClassifyResponse(
        model=model.name, model_version=model.version, label=model.labels[best[0]],
        top=[pb.LabelScore(label=model.labels[i], probability=float(probs[i]), index=i) for i in best],
        probabilities=probs.tolist(), request_id=request_id,
        timings=pb.Timings(preprocess_ms=answer.preprocess_s * ms, queue_ms=answer.queue_s * ms,
                           compute_ms=answer.compute_s * ms, total_ms=answer.total_s * ms,
                           batch_size=answer.batch_size))
