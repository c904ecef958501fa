"""KServe v2 / Open Inference Protocol: tritonclient works unchanged, answers equal the own API, and every
malformed tensor gets INVALID_ARGUMENT (or NOT_FOUND) with a message naming it, while the server stays up."""

from __future__ import annotations

import struct

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tritonclient.utils import InferenceServerException

from server._proto.kserve.v2 import grpc_service_pb2 as kpb
from server._proto.kserve.v2 import grpc_service_pb2_grpc as kpb_grpc
from server._proto.mmkd.v1 import inference_pb2 as pb
from server._proto.mmkd.v1 import inference_pb2_grpc as pb_grpc
from server.api_kserve import frame_bytes, unframe_bytes
from server.errors import RequestError
from tiny_bundle import LABELS, QUESTIONS, ServerThread, build_repository, make_image, settings_for


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    repo = build_repository(tmp_path_factory.mktemp("repo"), ("tiny",))
    with ServerThread(settings_for(repo, max_batch_size=8, max_queue_delay_ms=5)) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    c = triton.InferenceServerClient(server.address)
    yield c
    c.close()


@pytest.fixture(scope="module")
def raw(server):
    with grpc.insecure_channel(server.address) as channel:
        yield kpb_grpc.GRPCInferenceServiceStub(channel)


def triton_inputs(images: list[bytes], texts: list[str]) -> list[triton.InferInput]:
    image = triton.InferInput("image", [len(images), 1], "BYTES")
    image.set_data_from_numpy(np.array(images, dtype=np.object_).reshape(-1, 1))
    text = triton.InferInput("text", [len(texts), 1], "BYTES")
    text.set_data_from_numpy(np.array([t.encode() for t in texts], dtype=np.object_).reshape(-1, 1))
    return [image, text]


def test_tritonclient_infer_reads_logits_equal_to_the_own_api(client, server):
    images = [make_image(i) for i in range(3)]
    texts = list(QUESTIONS[:3])
    result = client.infer("tiny", triton_inputs(images, texts),
                          outputs=[triton.InferRequestedOutput("logits"), triton.InferRequestedOutput("label")])
    logits = result.as_numpy("logits")
    labels = result.as_numpy("label")
    assert logits.shape == (3, len(LABELS)) and logits.dtype == np.float32
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.InferenceStub(channel)
        for i in range(3):
            own = stub.Classify(pb.ClassifyRequest(model="tiny", image=images[i], text=texts[i]), timeout=10)
            e = np.exp(logits[i].astype(np.float64) - logits[i].max())
            np.testing.assert_allclose(own.probabilities, e / e.sum(), atol=1e-5)
            assert labels[i][0].decode() == own.label


def test_tritonclient_metadata_config_and_readiness(client):
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("tiny")
    meta = client.get_model_metadata("tiny")
    assert [i.name for i in meta.inputs] == ["image", "text"] and meta.inputs[0].datatype == "BYTES"
    assert meta.outputs[0].name == "logits" and list(meta.outputs[0].shape) == [-1, len(LABELS)]
    config = client.get_model_config("tiny").config
    assert config.max_batch_size == 8 and config.parameters["provider"].string_value == "CPUExecutionProvider"
    assert config.dynamic_batching.max_queue_delay_microseconds == 5000
    assert client.get_server_metadata().name == "mmkd"
    with pytest.raises(InferenceServerException) as err:
        client.is_model_ready("nope")
    assert err.value.status() == "StatusCode.NOT_FOUND" and "not served" in err.value.message()


def test_default_outputs_and_bytes_contents_inputs_are_accepted(raw):
    request = kpb.ModelInferRequest(model_name="tiny", id="req-7")
    request.inputs.add(name="image", datatype="BYTES", shape=[1]).contents.bytes_contents.append(make_image(1))
    request.inputs.add(name="text", datatype="BYTES", shape=[1]).contents.bytes_contents.append(b"is there a circle")
    response = raw.ModelInfer(request, timeout=10)
    assert response.id == "req-7" and [o.name for o in response.outputs] == ["logits", "label"]
    logits = np.frombuffer(response.raw_output_contents[0], dtype="<f4").reshape(list(response.outputs[0].shape))
    (size,) = struct.unpack_from("<I", response.raw_output_contents[1])
    assert response.raw_output_contents[1][4:4 + size].decode() == LABELS[int(np.argmax(logits[0]))]


def _framed(*elements: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


def _request(**changes) -> kpb.ModelInferRequest:
    """A good raw request, then `changes` break one thing."""
    request = kpb.ModelInferRequest(model_name=changes.get("model", "tiny"))
    names = changes.get("names", ("image", "text"))
    dtypes = changes.get("dtypes", ("BYTES", "BYTES"))
    shapes = changes.get("shapes", ([1, 1], [1, 1]))
    for name, dtype, shape in zip(names, dtypes, shapes):
        request.inputs.add(name=name, datatype=dtype, shape=shape)
    contents = changes.get("raw", (_framed(make_image(2)), _framed(b"what color is the circle ?")))
    request.raw_input_contents.extend(contents)
    for out in changes.get("outputs", ()):
        request.outputs.add(name=out)
    return request


BAD_TENSORS = {
    "wrong input name": (dict(names=("picture", "text")), grpc.StatusCode.INVALID_ARGUMENT, "'picture'"),
    "missing input": (dict(names=("image",), raw=(_framed(b"x"),)), grpc.StatusCode.INVALID_ARGUMENT, "text"),
    "wrong datatype": (dict(dtypes=("BYTES", "FP32")), grpc.StatusCode.INVALID_ARGUMENT, "datatype"),
    "wrong shape rank": (dict(shapes=([1, 1], [1, 2, 1])), grpc.StatusCode.INVALID_ARGUMENT, "shape"),
    "shape vs element count": (dict(shapes=([2, 1], [2, 1])), grpc.StatusCode.INVALID_ARGUMENT, "elements"),
    "batch over max": (dict(shapes=([9], [9])), grpc.StatusCode.INVALID_ARGUMENT, "max_batch_size"),
    "broken framing": (dict(raw=(b"\x10\x00", _framed(b"hi"))), grpc.StatusCode.INVALID_ARGUMENT, "framing"),
    "length past end": (dict(raw=(struct.pack("<I", 99) + b"abc", _framed(b"hi"))),
                        grpc.StatusCode.INVALID_ARGUMENT, "declares 99"),
    "raw count mismatch": (dict(raw=(_framed(b"x"),)), grpc.StatusCode.INVALID_ARGUMENT, "raw_input_contents"),
    "text not utf-8": (dict(raw=(_framed(make_image(2)), _framed(b"\xff\xfe"))),
                       grpc.StatusCode.INVALID_ARGUMENT, "UTF-8"),
    "undecodable image": (dict(raw=(_framed(b"GIF89a..."), _framed(b"hi"))), grpc.StatusCode.INVALID_ARGUMENT,
                          "image"),
    "empty text": (dict(raw=(_framed(make_image(2)), _framed(b" "))), grpc.StatusCode.INVALID_ARGUMENT, "text"),
    "unknown output": (dict(outputs=("probs",)), grpc.StatusCode.INVALID_ARGUMENT, "'probs'"),
    "unknown model": (dict(model="nope"), grpc.StatusCode.NOT_FOUND, "nope"),
}


@pytest.mark.parametrize("case", sorted(BAD_TENSORS))
def test_each_malformed_tensor_gets_its_code_then_a_good_request_works(raw, case):
    changes, code, needle = BAD_TENSORS[case]
    with pytest.raises(grpc.RpcError) as err:
        raw.ModelInfer(_request(**changes), timeout=10)
    assert err.value.code() == code, err.value.details()
    assert needle in err.value.details()
    assert len(raw.ModelInfer(_request(), timeout=10).raw_output_contents) == 2


def test_bad_element_in_a_batch_names_its_index(raw):
    request = _request(shapes=([2], [2]), raw=(_framed(make_image(1), b"junk"), _framed(b"hi", b"there")))
    with pytest.raises(grpc.RpcError) as err:
        raw.ModelInfer(request, timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "image[1]" in err.value.details()


# ---- BYTES framing, property-based -------------------------------------------------------------------------------

@given(st.lists(st.binary(max_size=40), max_size=6))
def test_framing_round_trips(elements):
    assert unframe_bytes(frame_bytes(elements), "x") == elements


@given(st.binary(max_size=64))
def test_unframing_arbitrary_bytes_either_parses_exactly_or_raises_request_error(data):
    try:
        elements = unframe_bytes(data, "inputs[image]")
    except RequestError as exc:
        assert exc.field == "inputs[image]"
    else:
        assert frame_bytes(elements) == data


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(image=st.binary(max_size=200), text=st.binary(max_size=40), shape=st.sampled_from([[1], [1, 1], [2], [0]]))
def test_random_tensors_get_invalid_argument_or_an_answer_never_a_crash(raw, image, text, shape):
    request = _request(shapes=(shape, shape), raw=(image, text))
    try:
        response = raw.ModelInfer(request, timeout=10)
        assert len(response.raw_output_contents) == 2
    except grpc.RpcError as err:
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
