"""Send corpus cases over grpc.aio and record what came back: status name, message, latency, answer."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

import grpc
import numpy as np

from benchmarks.robustness.corpus import Case
from server._proto.kserve.v2 import grpc_service_pb2_grpc as kserve_grpc
from server._proto.mmkd.v1 import inference_pb2 as pb
from server._proto.mmkd.v1 import inference_pb2_grpc as pb_grpc

FIELD_RE = re.compile(r"^[A-Za-z_]+(\[[^\]]*\])*: \S")  # "image: ...", "inputs[text]: ...", "image[1]: ..."
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 64 * 1024 * 1024),
                   ("grpc.max_send_message_length", 64 * 1024 * 1024)]


@dataclass(frozen=True)
class Outcome:
    """What the server answered to one case."""

    code: str
    message: str
    latency_s: float
    label: str | None = None
    scores: tuple[float, ...] | None = None  # probabilities (mmkd) or logits (kserve)


def message_problem(outcome: Outcome) -> str | None:
    """Why an error's message is not good enough for a user, or None: every error needs one, and bad input must
    name the field at fault."""
    if outcome.code == "OK":
        return None
    if not outcome.message.strip():
        return "empty message"
    if outcome.code == "INVALID_ARGUMENT" and not FIELD_RE.match(outcome.message):
        return "message does not start with the field at fault"
    return None


class Caller:
    """Both APIs' stubs on one channel."""

    def __init__(self, channel: grpc.aio.Channel, metadata: tuple[tuple[str, str], ...] = ()) -> None:
        self.v1 = pb_grpc.InferenceStub(channel)
        self.kserve = kserve_grpc.GRPCInferenceServiceStub(channel)
        self.metadata = metadata or None

    async def call(self, case: Case, timeout: float = 30.0) -> Outcome:
        start = time.monotonic()
        try:
            if case.api == "mmkd":
                r = await self.v1.Classify(case.request, timeout=timeout, metadata=self.metadata)
                return Outcome("OK", "", time.monotonic() - start, r.label, tuple(r.probabilities))
            r = await self.kserve.ModelInfer(case.request, timeout=timeout, metadata=self.metadata)
            logits = np.frombuffer(r.raw_output_contents[0], dtype="<f4")
            label = r.raw_output_contents[1][4:].decode() if len(r.raw_output_contents) > 1 else None
            return Outcome("OK", "", time.monotonic() - start, label, tuple(float(x) for x in logits))
        except grpc.aio.AioRpcError as exc:
            return Outcome(exc.code().name, exc.details() or "", time.monotonic() - start)

    async def stream(self, cases: list[Case], timeout: float = 60.0) -> list[Outcome]:
        """Send mmkd cases on one ClassifyStream; in-stream errors become outcomes with their code."""
        start = time.monotonic()
        requests = [pb.ClassifyRequest(model=c.request.model, image=c.request.image, text=c.request.text,
                                       request_id=str(i)) for i, c in enumerate(cases)]
        outcomes: list[Outcome] = []
        call = self.v1.ClassifyStream(iter(requests), timeout=timeout, metadata=self.metadata)
        try:
            async for item in call:
                elapsed = time.monotonic() - start
                if item.HasField("error"):
                    outcomes.append(Outcome(grpc.StatusCode(_code(item.error.code)).name, item.error.message,
                                            elapsed))
                else:
                    r = item.response
                    outcomes.append(Outcome("OK", "", elapsed, r.label, tuple(r.probabilities)))
        except grpc.aio.AioRpcError as exc:  # the whole stream failed: every unanswered case gets its code
            outcomes += [Outcome(exc.code().name, exc.details() or "", time.monotonic() - start)] * (
                len(cases) - len(outcomes))
        return outcomes


def _code(value: int) -> tuple:
    for code in grpc.StatusCode:
        if code.value[0] == value:
            return code.value
    return grpc.StatusCode.UNKNOWN.value


def same_answer(a: Outcome, b: Outcome, atol: float = 1e-4) -> bool:
    """Equal labels and scores within atol (batch composition may move the last float bits)."""
    if a.label != b.label or a.scores is None or b.scores is None or len(a.scores) != len(b.scores):
        return False
    return bool(np.allclose(a.scores, b.scores, atol=atol))
