"""grpc.health.v1 (overall, per service, per model), server reflection, and draining as a client sees it."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from server._proto.mmkd.v1 import inference_pb2 as pb
from server._proto.mmkd.v1 import inference_pb2_grpc as pb_grpc
from tiny_bundle import ServerThread, build_repository, make_image, settings_for

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return build_repository(tmp_path_factory.mktemp("repo"), ("tiny", "tiny2"))


@pytest.fixture(scope="module")
def server(repo):
    with ServerThread(settings_for(repo)) as srv:
        yield srv


def check(channel, service: str) -> int:
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


@pytest.mark.parametrize("service", ["", "mmkd.v1.Inference", "inference.GRPCInferenceService", "tiny", "tiny2"])
def test_health_serving_overall_per_service_and_per_model(server, service):
    with grpc.insecure_channel(server.address) as channel:
        assert check(channel, service) == SERVING


def test_health_unknown_service_is_not_found(server):
    with grpc.insecure_channel(server.address) as channel, pytest.raises(grpc.RpcError) as err:
        check(channel, "no-such-model")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def reflect(channel, request: reflection_pb2.ServerReflectionRequest) -> reflection_pb2.ServerReflectionResponse:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    return next(iter(stub.ServerReflectionInfo(iter([request]), timeout=5)))


def test_reflection_lists_every_service_and_serves_their_files(server):
    with grpc.insecure_channel(server.address) as channel:
        listed = reflect(channel, reflection_pb2.ServerReflectionRequest(list_services=""))
        names = {s.name for s in listed.list_services_response.service}
        assert {"mmkd.v1.Inference", "inference.GRPCInferenceService", "grpc.health.v1.Health"} <= names
        for symbol in ("mmkd.v1.Inference", "inference.GRPCInferenceService", "inference.ModelInferRequest"):
            found = reflect(channel, reflection_pb2.ServerReflectionRequest(file_containing_symbol=symbol))
            assert found.WhichOneof("message_response") == "file_descriptor_response", symbol
            assert found.file_descriptor_response.file_descriptor_proto


def test_drain_turns_health_not_serving_refuses_new_requests_and_finishes_queued_ones(repo):
    srv = ServerThread(settings_for(repo, models=("tiny",), max_batch_size=64, max_queue_delay_ms=800, eager_dispatch=False))
    with srv, grpc.insecure_channel(srv.address) as channel:
        stub = pb_grpc.InferenceStub(channel)
        queued = stub.Classify.future(pb.ClassifyRequest(model="tiny", image=make_image(0), text="is there a circle"),
                                      timeout=10)
        while srv.metric("mmkd_queue_depth", {"model": "tiny"}) < 1:
            time.sleep(0.01)
        stopping = asyncio.run_coroutine_threadsafe(srv.server.stop(5), srv.loop)
        time.sleep(0.1)
        assert check(channel, "") == NOT_SERVING and check(channel, "tiny") == NOT_SERVING
        with pytest.raises(grpc.RpcError) as err:
            stub.Classify(pb.ClassifyRequest(model="tiny", image=make_image(1), text="is there a circle"), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert queued.result().label  # the request queued before the drain is answered
        stopping.result(10)
