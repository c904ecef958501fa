"""Bad input, systematically, over both APIs (mmkd.v1 Classify/ClassifyStream and KServe ModelInfer): the crafted
corpus of benchmarks/robustness, a short harness run with good requests interleaved, and hypothesis.

Every case must get its status code and a message naming the field, the server must stay up, and good requests
sent between bad ones must keep their answers. (The 10,000-request run is `python -m benchmarks.robustness fuzz`.)
"""

from __future__ import annotations

import asyncio
import io

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageOps

from benchmarks.robustness import corpus
from benchmarks.robustness import images as im
from benchmarks.robustness.client import CHANNEL_OPTIONS, Caller, message_problem
from benchmarks.robustness.fuzz import run_fuzz
from server._proto.kserve.v2 import grpc_service_pb2 as kpb
from tiny_bundle import ServerThread, build_repository, settings_for

LIMITS = {"max_text_chars": 256, "max_image_bytes": 300_000, "max_message_bytes": 1_000_000}
CRAFTED = corpus.crafted("tiny", **LIMITS)
FUZZ = settings(max_examples=60, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    repo = build_repository(tmp_path_factory.mktemp("repo"), ("tiny",))
    with ServerThread(settings_for(repo, max_batch_size=4, **LIMITS)) as srv:
        yield srv


def call(srv, case: corpus.Case):
    """One case on a fresh aio channel (from this synchronous test)."""
    async def go():
        async with grpc.aio.insecure_channel(srv.address, options=CHANNEL_OPTIONS) as channel:
            return await Caller(channel).call(case, timeout=30)
    return asyncio.run(go())


@pytest.mark.parametrize("index", range(len(CRAFTED)), ids=[f"{c.cls}-{c.api}" for c in CRAFTED])
def test_crafted_case_gets_its_code_and_a_message_naming_the_field(server, index):
    case = CRAFTED[index]
    outcome = call(server, case)
    assert outcome.code in case.expect, outcome.message
    assert message_problem(outcome) is None, outcome.message


def test_corpus_covers_every_class_the_issue_lists():
    classes = {c.cls for c in CRAFTED}
    for needed in ("truncated_png", "truncated_jpeg", "truncated_webp", "corrupt_png_crc", "non_image", "zero_bytes",
                   "bomb_png_header", "bomb_jpeg_header", "bomb_png_zip", "mode_I;16", "mode_P", "mode_CMYK",
                   "mode_L", "mode_RGBA", "exif_orientation_6", "text_huge", "text_empty", "text_control",
                   "text_combining", "unknown_model", "kserve_wrong_name", "kserve_wrong_datatype",
                   "kserve_wrong_shape", "kserve_element_count", "kserve_framing_length_past_end",
                   "kserve_framing_short_prefix", "image_over_byte_limit", "message_over_size_limit"):
        assert needed in classes, needed
    assert {c.api for c in CRAFTED if c.cls == "truncated_png"} == {"mmkd", "kserve"}


def test_generated_malformed_requests_with_good_ones_interleaved(server):
    """The harness itself on a short run: unary and ClassifyStream, both APIs, good answers unchanged."""
    result = asyncio.run(run_fuzz(server.address, "tiny", requests=400, seed=1, concurrency=4, probe_every=5,
                                  limits=LIMITS))
    summary = result.summary()
    assert result.passed, (summary, result.examples)
    assert summary["malformed"] >= 300 and summary["valid_sent"] >= 80
    assert summary["by_api"]["mmkd"] > 100 and summary["by_api"]["kserve"] > 100


def _answer(srv, image: bytes):
    return call(srv, corpus.Case("valid", "mmkd", corpus.classify("tiny", image, corpus.GOOD_TEXT), corpus.OK))


@pytest.mark.parametrize("orientation", [2, 3, 5, 6, 8])
def test_exif_orientation_is_applied_before_the_model_sees_the_image(server, orientation):
    raw = Image.fromarray(im.pixels(4, 24, 16), "RGB")
    exif = Image.Exif()
    exif[0x0112] = orientation
    oriented = im.encode(raw, "PNG", exif=exif.tobytes())
    upright = im.encode(ImageOps.exif_transpose(Image.open(io.BytesIO(oriented))), "PNG")
    a, b = _answer(server, oriented), _answer(server, upright)
    assert a.code == b.code == "OK"
    np.testing.assert_allclose(a.scores, b.scores, atol=1e-6)


def test_16_bit_image_is_rescaled_like_its_8_bit_version(server):
    eight = im.pixels(5, 20, 20, 1)
    sixteen = im.encode(Image.fromarray(eight.astype(np.uint16) * 257), "PNG")
    a, b = _answer(server, sixteen), _answer(server, im.encode(Image.fromarray(eight, "L"), "PNG"))
    assert a.code == b.code == "OK"
    np.testing.assert_allclose(a.scores, b.scores, atol=1e-6)


# ---- hypothesis -------------------------------------------------------------------------------------------------

GOOD = im.rgb(9, size=16)


@FUZZ
@given(image=st.one_of(st.binary(max_size=300), st.integers(0, len(GOOD)).map(lambda n: GOOD[:n]),
                       st.lists(st.integers(0, len(GOOD) - 1), min_size=1, max_size=6).map(
                           lambda ix: bytes(b ^ 0x55 if i in ix else b for i, b in enumerate(GOOD)))),
       text=st.text(max_size=300), api=st.sampled_from(["mmkd", "kserve"]))
def test_random_image_bytes_and_text_get_ok_or_invalid_argument(server, image, text, api):
    request = (corpus.classify("tiny", image, text) if api == "mmkd"
               else corpus.infer("tiny", [image], [text.encode("utf-8", "surrogatepass")]))
    outcome = call(server, corpus.Case("hypothesis", api, request, corpus.MAYBE))
    assert outcome.code in ("OK", "INVALID_ARGUMENT"), outcome.message
    assert message_problem(outcome) is None, outcome.message
    if not text.strip() or len(text) > LIMITS["max_text_chars"]:
        assert outcome.code == "INVALID_ARGUMENT"


@FUZZ
@given(names=st.lists(st.sampled_from(["image", "text", "IMAGE", "", "x"]), min_size=0, max_size=3),
       dtype=st.sampled_from(["BYTES", "FP32", "INT8", "", "BYTES "]),
       shape=st.lists(st.integers(-2, 6), max_size=3), raw=st.lists(st.binary(max_size=40), max_size=3),
       outputs=st.lists(st.sampled_from(["logits", "label", "probs"]), max_size=2))
def test_random_kserve_tensors_get_invalid_argument_never_a_crash(server, names, dtype, shape, raw, outputs):
    request = kpb.ModelInferRequest(model_name="tiny")
    for name in names:
        request.inputs.add(name=name, datatype=dtype, shape=shape)
    request.raw_input_contents.extend(raw)
    for name in outputs:
        request.outputs.add(name=name)
    outcome = call(server, corpus.Case("hypothesis", "kserve", request, corpus.INVALID))
    assert outcome.code == "INVALID_ARGUMENT", outcome.message  # random tensors never hold a valid image
    assert message_problem(outcome) is None, outcome.message


def test_server_still_answers_after_the_fuzzing(server):
    ok = _answer(server, GOOD)
    assert ok.code == "OK" and ok.label
