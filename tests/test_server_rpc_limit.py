"""--max-concurrent-rpcs over real loopback gRPC: past the limit gRPC itself refuses new RPCs at once with
RESOURCE_EXHAUSTED and a message (no handler runs, so nothing piles up in front of the batchers' own queue check),
a ClassifyStream counts as one RPC, admitted requests are still answered correctly, and the count stays honest
after a wave of refusals (grpc/grpc#41531: an underflowing count let every later wave through).

Holding the limit is deterministic, not timed: with eager dispatch off and a 10 s queue delay, the held requests
wait until one more request fills the batch, and that request comes on the already admitted stream.
"""

from __future__ import annotations

import asyncio
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from server._proto.mmkd.v1 import inference_pb2 as pb
from server._proto.mmkd.v1 import inference_pb2_grpc as pb_grpc
from tiny_bundle import QUESTIONS, ServerThread, build_repository, make_image, reference_probs, settings_for

LIMIT = 4  # RPCs: UNARY held unary calls + one stream
UNARY = LIMIT - 1
STREAM_HELD = 3  # requests the stream holds in the queue
BATCH = UNARY + STREAM_HELD + 1  # one more stream request fills the batch and releases everything
FLOOD = 8
QUICK_S = 1.0  # a refusal must come well under the flood's 5 s deadline


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return build_repository(tmp_path_factory.mktemp("repo"), ("tiny",))


def request(i: int) -> pb.ClassifyRequest:
    return pb.ClassifyRequest(model="tiny", image=make_image(i), text=QUESTIONS[i % len(QUESTIONS)],
                              request_id=str(i))


async def _outcome(call) -> tuple[str, str, float]:
    start = time.monotonic()
    try:
        await call
        return "OK", "", time.monotonic() - start
    except grpc.aio.AioRpcError as exc:
        return exc.code().name, exc.details() or "", time.monotonic() - start


async def _wave(srv: ServerThread, channel: grpc.aio.Channel, base: int) -> tuple[list, dict[str, pb.ClassifyResponse]]:
    """Fill the limit with UNARY unary calls and one stream, flood it, release; returns the flood's outcomes and
    every admitted answer by request id."""
    stub = pb_grpc.InferenceStub(channel)
    health = health_pb2_grpc.HealthStub(channel)
    held = [asyncio.ensure_future(stub.Classify(request(base + i), timeout=10)) for i in range(UNARY)]
    feed: asyncio.Queue = asyncio.Queue()

    async def stream_requests():
        while (item := await feed.get()) is not None:
            yield item

    stream = stub.ClassifyStream(stream_requests(), timeout=10)

    async def read_stream():
        return [item async for item in stream]

    reader = asyncio.ensure_future(read_stream())
    for i in range(STREAM_HELD):
        feed.put_nowait(request(base + UNARY + i))
    deadline = time.monotonic() + 10
    while srv.metric("mmkd_queue_depth", {"model": "tiny"}) < UNARY + STREAM_HELD:
        assert time.monotonic() < deadline, "the held requests never reached the queue"
        await asyncio.sleep(0.01)

    flood = await asyncio.gather(*(_outcome(stub.Classify(request(base + 50 + i), timeout=5)) for i in range(FLOOD)),
                                 _outcome(health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)))

    feed.put_nowait(request(base + BATCH - 1))  # fills the batch: everything held runs now
    feed.put_nowait(None)
    answers = {r.request_id: r for r in await asyncio.gather(*held)}
    for item in await reader:
        assert item.HasField("response"), item.error
        answers[item.request_id] = item.response
    return flood, answers


def test_rpcs_past_the_limit_are_refused_at_once_and_admitted_ones_are_answered(repo):
    settings = settings_for(repo, max_concurrent_rpcs=LIMIT, max_batch_size=BATCH, max_queue_delay_ms=10_000,
                            eager_dispatch=False, max_queue_size=64)

    async def scenario(srv):
        async with grpc.aio.insecure_channel(srv.address) as channel:
            waves = [await _wave(srv, channel, base) for base in (0, 100)]
            after = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""),
                                                                     timeout=5)
            return waves, after

    with ServerThread(settings) as srv:
        assert srv.server.rpc_limit == LIMIT
        waves, health_after = asyncio.run(asyncio.wait_for(scenario(srv), 60))
        answered_by_engine = {code: srv.metric("mmkd_requests_total", {"model": "tiny", "api": "mmkd.v1",
                                                                        "code": code})
                              for code in ("OK", "RESOURCE_EXHAUSTED")}
        queue_full = srv.metric("mmkd_dropped_total", {"model": "tiny", "reason": "queue_full"})
        batches = srv.metric("mmkd_batch_size_count", {"model": "tiny"})

    for (flood, answers), base in zip(waves, (0, 100)):
        # every excess RPC, health checks included, is refused by gRPC quickly and with a message; the second
        # wave is refused just like the first, so the count did not drift down with the refusals
        assert [code for code, _, _ in flood] == ["RESOURCE_EXHAUSTED"] * (FLOOD + 1), flood
        assert all(details for _, details, _ in flood), flood
        assert max(t for _, _, t in flood) < QUICK_S, flood
        # the admitted ones (a stream of several requests counting as one RPC) are all answered, correctly
        assert sorted(answers, key=int) == [str(base + i) for i in range(BATCH)]
        for rid, response in answers.items():
            assert response.timings.batch_size == BATCH
            sent = request(int(rid))
            np.testing.assert_allclose(response.probabilities, reference_probs(repo / "tiny", sent.image, sent.text),
                                       atol=1e-5)
    assert health_after.status == health_pb2.HealthCheckResponse.SERVING  # slots come back once RPCs finish
    # the refusals came from gRPC before any handler ran: the engine saw only the admitted requests
    assert answered_by_engine == {"OK": 2 * BATCH, "RESOURCE_EXHAUSTED": 0}
    assert queue_full == 0 and batches == 2


def test_default_limit_leaves_room_for_every_models_queue(repo):
    with ServerThread(settings_for(repo, max_queue_size=32, max_batch_size=8, instances=2)) as srv:
        assert srv.server.rpc_limit == 32 + 2 * 8 + 64
