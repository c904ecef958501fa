"""mmkd.v1 over real loopback gRPC: answers equal in-process ONNX Runtime, batching, streaming, every error
class with its status code, backpressure and deadlines, several models side by side."""

from __future__ import annotations

import asyncio
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest

from server._proto.mmkd.v1 import inference_pb2 as pb
from server._proto.mmkd.v1 import inference_pb2_grpc as pb_grpc
from tiny_bundle import QUESTIONS, ServerThread, build_repository, make_image, reference_probs, settings_for


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return build_repository(tmp_path_factory.mktemp("repo"), ("tiny", "tiny2"))


@pytest.fixture(scope="module")
def server(repo):
    # inline_compute_ms=0 (the default, stated because the batching checks depend on it): the tiny models compute
    # in microseconds, so with --inline-compute-ms staggered requests would each run alone on the event loop.
    settings = settings_for(repo, max_batch_size=16, max_queue_delay_ms=20, metrics_port=0, inline_compute_ms=0)
    with ServerThread(settings) as srv:
        yield srv


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.address) as channel:
        yield pb_grpc.InferenceStub(channel)


def classify(stub, model="tiny", seed=0, text=QUESTIONS[0], **kw):
    return stub.Classify(pb.ClassifyRequest(model=model, image=make_image(seed), text=text, **kw), timeout=10)


def test_thread_pool_preprocessing_gives_the_same_answers_as_inline(repo):
    # Images above --inline-preprocess-bytes are decoded in the thread pool; 0 sends every one there.
    with ServerThread(settings_for(repo, inline_preprocess_bytes=0)) as srv, grpc.insecure_channel(srv.address) as ch:
        pooled = pb_grpc.InferenceStub(ch)
        for seed, text in enumerate(QUESTIONS):
            response = classify(pooled, seed=seed, text=text)
            np.testing.assert_allclose(response.probabilities,
                                       reference_probs(repo / "tiny", make_image(seed), text), atol=1e-5)


@pytest.mark.parametrize("place, kind", [("batch", "thread"), ("loop", "thread"), ("batch", "process")])
def test_malformed_request_in_a_batch_fails_alone_wherever_requests_are_prepared(repo, place, kind):
    # --preprocess-in batch: the compute thread (or the model process, whose InputError crosses the pipe)
    # prepares a batch's requests and a malformed one is only found there; it must fail alone with its own
    # INVALID_ARGUMENT while the rest of its batch is answered.
    settings = settings_for(repo, preprocess_in=place, instance_kind=kind, max_batch_size=16,
                            max_queue_delay_ms=300, eager_dispatch=False)
    with ServerThread(settings) as srv, grpc.insecure_channel(srv.address) as ch:
        client = pb_grpc.InferenceStub(ch)
        bad = pb.ClassifyRequest(model="tiny", image=b"\x89PNG\r\n\x1a\n garbage", text="what")
        with ThreadPoolExecutor(8) as pool:
            good = [pool.submit(classify, client, seed=i, text=QUESTIONS[i % 5]) for i in range(6)]
            failed = pool.submit(client.Classify, bad, timeout=10)
            with pytest.raises(grpc.RpcError) as err:
                failed.result()
            answers = [f.result() for f in good]
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "image" in err.value.details()
    for i, answer in enumerate(answers):
        expected = reference_probs(repo / "tiny", make_image(i), QUESTIONS[i % 5])
        np.testing.assert_allclose(answer.probabilities, expected, atol=1e-5)
    assert max(a.timings.batch_size for a in answers) > 1, "the 300 ms delay should have batched the requests"


def test_inline_compute_gives_the_same_answers_alone_and_under_concurrency(repo):
    # --inline-compute-ms: a lone request runs on the event loop (never queued); concurrent ones get their own
    # answers whichever way they run (that simultaneous arrivals batch is proven in test_batcher.py).
    settings = settings_for(repo, inline_compute_ms=1000.0, max_batch_size=16, max_queue_delay_ms=50)
    with ServerThread(settings) as srv, grpc.insecure_channel(srv.address) as ch:
        inline = pb_grpc.InferenceStub(ch)
        for seed, text in enumerate(QUESTIONS):
            response = classify(inline, seed=seed, text=text)
            np.testing.assert_allclose(response.probabilities,
                                       reference_probs(repo / "tiny", make_image(seed), text), atol=1e-5)
            assert response.timings.queue_ms == 0.0 and response.timings.batch_size == 1
        with ThreadPoolExecutor(16) as pool:  # concurrent requests: inline or batched, each gets its own answer
            responses = list(pool.map(lambda i: classify(inline, seed=i % 4), range(64)))
        expected = [reference_probs(repo / "tiny", make_image(seed), QUESTIONS[0]) for seed in range(4)]
        for i, response in enumerate(responses):
            np.testing.assert_allclose(response.probabilities, expected[i % 4], atol=1e-5)


def test_classify_equals_in_process_onnx_runtime(stub, repo):
    for seed, text in enumerate(QUESTIONS):
        response = classify(stub, seed=seed, text=text, top_k=3)
        expected = reference_probs(repo / "tiny", make_image(seed), text)
        np.testing.assert_allclose(response.probabilities, expected, atol=1e-5)
        assert response.label == response.top[0].label
        assert response.top[0].index == int(np.argmax(expected))
        assert [s.label for s in response.top] == [("red", "green", "blue", "yes", "no")[i]
                                                  for i in np.argsort(-expected, kind="stable")[:3]]
        assert response.model == "tiny" and response.model_version == "1"
        assert response.timings.total_ms > 0 and response.timings.batch_size >= 1


def test_concurrent_requests_are_served_in_batches(stub, server):
    before_sum = server.metric("mmkd_batch_size_sum", {"model": "tiny2"})
    before_count = server.metric("mmkd_batch_size_count", {"model": "tiny2"})
    with ThreadPoolExecutor(32) as pool:
        futures = [pool.submit(classify, stub, "tiny2", i, QUESTIONS[i % 5]) for i in range(32)]
        responses = [f.result() for f in futures]
    assert all(r.model == "tiny2" for r in responses)
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.server.metrics_port}/metrics", timeout=5).read().decode()
    total = _sample(text, 'mmkd_batch_size_sum{model="tiny2"}') - before_sum
    count = _sample(text, 'mmkd_batch_size_count{model="tiny2"}') - before_count
    assert total == 32
    assert total / count > 1.0, f"32 concurrent requests ran in {count} batches: not batched"
    assert _sample(text, 'mmkd_requests_total{api="mmkd.v1",code="OK",model="tiny2"}') >= 32
    assert 'mmkd_model_info{model="tiny2",provider="CPUExecutionProvider",variant="fp32",version="1"} 1.0' in text


def _sample(text: str, key: str) -> float:
    for line in text.splitlines():
        if line.startswith(key + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{key} not in metrics")


def test_classify_stream_answers_in_request_order_and_reports_bad_items_in_stream(stub, repo):
    requests = [pb.ClassifyRequest(model="tiny", image=make_image(i), text=QUESTIONS[i % 5], request_id=f"r{i}")
                for i in range(12)]
    requests.insert(5, pb.ClassifyRequest(model="tiny", image=b"not an image", text="what", request_id="bad"))
    # Batches wait up to 500 ms for company (no eager dispatch), so that streamed requests meet in a batch even
    # when a busy machine reads the stream slowly.
    patient = settings_for(repo, max_batch_size=16, max_queue_delay_ms=500, eager_dispatch=False)
    with ServerThread(patient) as srv, grpc.insecure_channel(srv.address) as channel:
        answers = list(pb_grpc.InferenceStub(channel).ClassifyStream(iter(requests), timeout=20))
    assert [a.request_id for a in answers] == [r.request_id for r in requests]
    bad = answers[5]
    assert bad.WhichOneof("result") == "error"
    assert bad.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and "image" in bad.error.message
    good = [a for a in answers if a.request_id != "bad"]
    assert all(a.WhichOneof("result") == "response" for a in good)
    single = classify(stub, seed=3, text=QUESTIONS[3])
    assert np.allclose(good[3].response.probabilities, single.probabilities, atol=1e-6)
    assert max(a.response.timings.batch_size for a in good) > 1  # streamed requests batch together


def test_list_and_get_model_report_the_provider_in_use(stub):
    listed = stub.ListModels(pb.ListModelsRequest(), timeout=5)
    assert [m.name for m in listed.models] == ["tiny", "tiny2"]
    info = stub.GetModel(pb.GetModelRequest(name="tiny"), timeout=5)
    assert info.provider == "CPUExecutionProvider" and info.device_id == -1
    assert info.ready and info.variant == "fp32" and list(info.labels) == ["red", "green", "blue", "yes", "no"]
    assert info.preprocess.image_size == 16 and info.max_batch_size == 16
    with pytest.raises(grpc.RpcError) as err:
        stub.GetModel(pb.GetModelRequest(name="nope"), timeout=5)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def _big_png() -> bytes:
    return make_image(0, size=80)  # 6400 pixels; the strict server below allows 4096


BAD_INPUTS = {
    "undecodable image": (dict(image=b"\x89PNG\r\n\x1a\n garbage"), grpc.StatusCode.INVALID_ARGUMENT, "image"),
    "empty image": (dict(image=b""), grpc.StatusCode.INVALID_ARGUMENT, "image"),
    "oversize image": (dict(image=_big_png()), grpc.StatusCode.INVALID_ARGUMENT, "image"),
    "too many image bytes": (dict(image=b"\0" * 70_000), grpc.StatusCode.INVALID_ARGUMENT, "image"),
    "empty text": (dict(text="   "), grpc.StatusCode.INVALID_ARGUMENT, "text"),
    "too long text": (dict(text="what " * 100), grpc.StatusCode.INVALID_ARGUMENT, "text"),
    "unknown model": (dict(model="no-such-model"), grpc.StatusCode.NOT_FOUND, "no-such-model"),
    "empty model": (dict(model=""), grpc.StatusCode.INVALID_ARGUMENT, "model"),
}


@pytest.fixture(scope="module")
def strict_stub(repo):
    settings = settings_for(repo, models=("tiny",), max_image_pixels=4096, max_image_bytes=65_536, max_text_chars=200)
    with ServerThread(settings) as srv, grpc.insecure_channel(srv.address) as channel:
        yield pb_grpc.InferenceStub(channel)


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_each_bad_input_gets_its_code_and_a_message_then_a_good_request_works(strict_stub, case):
    fields, code, needle = BAD_INPUTS[case]
    request = dict(model="tiny", image=make_image(1), text=QUESTIONS[0]) | fields
    with pytest.raises(grpc.RpcError) as err:
        strict_stub.Classify(pb.ClassifyRequest(**request), timeout=10)
    assert err.value.code() == code, err.value.details()
    assert needle in err.value.details()
    assert classify(strict_stub, seed=2).label  # the server still answers


def test_full_queue_answers_resource_exhausted_quickly(repo):
    # Batches wait 1 s for company, so the queue (size 3) fills and stays full.
    settings = settings_for(repo, models=("tiny",), max_batch_size=64, max_queue_delay_ms=1000, max_queue_size=3,
                            eager_dispatch=False)
    with ServerThread(settings) as srv, grpc.insecure_channel(srv.address) as channel:
        stub = pb_grpc.InferenceStub(channel)
        queued = [stub.Classify.future(pb.ClassifyRequest(model="tiny", image=make_image(i), text="is there a circle"),
                                       timeout=10) for i in range(3)]
        deadline = time.monotonic() + 5
        while srv.metric("mmkd_queue_depth", {"model": "tiny"}) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        start = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            classify(stub, seed=9)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert time.monotonic() - start < 0.5
        assert "queue full" in err.value.details()
        assert all(f.result().label for f in queued)  # the queued ones are still answered
        assert srv.metric("mmkd_dropped_total", {"model": "tiny", "reason": "queue_full"}) == 1


def test_deadline_passed_while_queued_is_never_computed(repo):
    settings = settings_for(repo, models=("tiny",), max_batch_size=64, max_queue_delay_ms=600, eager_dispatch=False)
    with ServerThread(settings) as srv, grpc.insecure_channel(srv.address) as channel:
        stub = pb_grpc.InferenceStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.Classify(pb.ClassifyRequest(model="tiny", image=make_image(0), text="is there a circle"), timeout=0.2)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        time.sleep(0.8)  # past the batch delay: an expired request must not have run
        assert srv.metric("mmkd_batch_size_count", {"model": "tiny"}) == 0
        reasons = ("expired", "cancelled")
        dropped = sum(srv.metric("mmkd_dropped_total", {"model": "tiny", "reason": r}) for r in reasons)
        assert dropped == 1
        assert classify(stub, seed=1).label  # and the model still serves


def test_two_models_answer_side_by_side_with_different_outputs(stub):
    a = classify(stub, "tiny", seed=4)
    b = classify(stub, "tiny2", seed=4)
    assert a.model == "tiny" and b.model == "tiny2"
    assert not np.allclose(a.probabilities, b.probabilities)


def test_async_client_can_pipeline_many_requests(server):
    async def main():
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = pb_grpc.InferenceStub(channel)
            calls = [stub.Classify(pb.ClassifyRequest(model="tiny", image=make_image(i), text=QUESTIONS[i % 5]),
                                   timeout=10) for i in range(40)]
            return await asyncio.gather(*calls)

    responses = asyncio.run(main())
    assert len(responses) == 40 and max(r.timings.batch_size for r in responses) > 1


def test_cancelled_stream_drops_its_queued_requests_before_compute(repo):
    settings = settings_for(repo, models=("tiny",), max_batch_size=64, max_queue_delay_ms=500, eager_dispatch=False)
    with ServerThread(settings) as srv, grpc.insecure_channel(srv.address) as channel:
        stub = pb_grpc.InferenceStub(channel)
        requests = [pb.ClassifyRequest(model="tiny", image=make_image(i), text="is there a circle") for i in range(3)]
        call = stub.ClassifyStream(iter(requests), timeout=10)
        deadline = time.monotonic() + 5
        while srv.metric("mmkd_queue_depth", {"model": "tiny"}) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        call.cancel()
        time.sleep(0.8)  # past the batch delay
        assert srv.metric("mmkd_batch_size_count", {"model": "tiny"}) == 0
        assert srv.metric("mmkd_dropped_total", {"model": "tiny", "reason": "cancelled"}) == 3
        assert srv.metric("mmkd_inflight_requests", {"model": "tiny"}) == 0
        assert classify(stub, seed=1).label


def test_burst_over_capacity_every_request_is_answered_or_refused_fast_and_the_server_recovers(repo):
    settings = settings_for(repo, models=("tiny",), max_batch_size=4, max_queue_delay_ms=50, max_queue_size=4,
                            inline_preprocess_bytes=0, eager_dispatch=False)

    async def burst(address):
        async with grpc.aio.insecure_channel(address) as channel:
            stub = pb_grpc.InferenceStub(channel)

            async def one(i):
                start = time.monotonic()
                try:
                    await stub.Classify(pb.ClassifyRequest(model="tiny", image=make_image(i), text="is there a circle"),
                                        timeout=10)
                    return "OK", time.monotonic() - start
                except grpc.aio.AioRpcError as exc:
                    return exc.code().name, time.monotonic() - start

            return await asyncio.gather(*(one(i) for i in range(40)))

    with ServerThread(settings) as srv:
        outcomes = asyncio.run(burst(srv.address))
        codes = [code for code, _ in outcomes]
        assert set(codes) == {"OK", "RESOURCE_EXHAUSTED"} and len(codes) == 40
        refused = [t for code, t in outcomes if code == "RESOURCE_EXHAUSTED"]
        assert max(refused) < 1.0
        assert srv.metric("mmkd_dropped_total", {"model": "tiny", "reason": "queue_full"}) == len(refused)
        with grpc.insecure_channel(srv.address) as channel:
            assert classify(pb_grpc.InferenceStub(channel), seed=1).label
