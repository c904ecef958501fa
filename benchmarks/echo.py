"""The gRPC floor: a bare grpc.aio server that speaks `mmkd.v1.Inference/Classify` and computes nothing.

It parses the same request (image bytes + text) and answers with a response of the same shape a real model gives
(a label, top-k scores, one probability per label, timings), so the difference between it and `mmkd-serve` is
exactly preprocessing, batching and the model. Run it in its own process:

    python -m benchmarks.echo --port 0 --labels 17      # prints "READY <port>" once it listens
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

import grpc

from server._proto.mmkd.v1 import inference_pb2 as pb
from server._proto.mmkd.v1 import inference_pb2_grpc as pb_grpc


def canned_response(num_labels: int, top_k: int = 5, name: str = "echo") -> pb.ClassifyResponse:
    """A response as large as a real one for `num_labels` labels."""
    probs = [1.0 / num_labels] * num_labels
    top = [pb.LabelScore(label=f"label{i}", probability=probs[i], index=i) for i in range(min(top_k, num_labels))]
    return pb.ClassifyResponse(model=name, model_version="1", label="label0", top=top, probabilities=probs,
                               timings=pb.Timings(batch_size=1))


class EchoServicer(pb_grpc.InferenceServicer):
    """Answers every Classify with the canned response; checks only that the payload arrived."""

    def __init__(self, num_labels: int, name: str = "echo") -> None:
        self.response = canned_response(num_labels, name=name)

    async def Classify(self, request: pb.ClassifyRequest, context: grpc.aio.ServicerContext) -> pb.ClassifyResponse:
        if not request.image or not request.text:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "image and text are required")
        reply = pb.ClassifyResponse()
        reply.CopyFrom(self.response)
        reply.request_id = request.request_id
        return reply


async def serve(port: int, num_labels: int, host: str = "127.0.0.1", name: str = "echo") -> None:
    """Listen until SIGTERM/SIGINT; print 'READY <port>' on stdout once bound (the harness waits for it)."""
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 16 * 1024 * 1024)])
    pb_grpc.add_InferenceServicer_to_server(EchoServicer(num_labels, name), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    print(f"READY {bound}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await server.stop(grace=1.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.echo", description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port (printed on the READY line)")
    parser.add_argument("--labels", type=int, default=17, help="label count of the model the echo stands in for")
    parser.add_argument("--name", default="echo", help="answered as the model name (tells replicas apart)")
    args = parser.parse_args(argv)
    asyncio.run(serve(args.port, args.labels, args.host, args.name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
