"""The server on bundles written by the real exporter (`export.api.bundle_model`): the fp32 graph from the dynamo
exporter with an extra output (in a variant sub-folder) and its int8 variant; answers equal in-process ORT.
Slow (two real exports with their parity gates), hence the mark."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from server._proto.mmkd.v1 import inference_pb2 as pb
from server._proto.mmkd.v1 import inference_pb2_grpc as pb_grpc
from tiny_bundle import ServerThread, reference_probs, settings_for

h = pytest.importorskip("export_helpers")
api = pytest.importorskip("export.api")


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("repo")
    tok = h.write_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.json")
    samples = h.make_samples(256)
    api.bundle_model(h.tiny_model(), root / "vqa" / "fp32", name="vqa", labels=h.LABELS, spec=h.SPEC,
                     tokenizer=tok, samples=samples, batch_sizes=(1, 4))
    api.bundle_model(h.tiny_model(), root / "vqa-int8", name="vqa-int8", labels=h.LABELS, spec=h.SPEC,
                     tokenizer=tok, samples=samples, variant="int8", batch_sizes=(1, 4))
    return root


@pytest.mark.slow
def test_exported_variants_are_served_and_answer_like_in_process_ort(repo):
    samples = h.make_samples(6, seed=5)
    with ServerThread(settings_for(repo, max_batch_size=8, max_queue_delay_ms=2)) as srv, \
            grpc.insecure_channel(srv.address) as channel:
        stub = pb_grpc.InferenceStub(channel)
        info = stub.GetModel(pb.GetModelRequest(name="vqa"), timeout=5)
        assert info.variant == "fp32" and info.provider == "CPUExecutionProvider"
        assert stub.GetModel(pb.GetModelRequest(name="vqa-int8"), timeout=5).variant == "int8"
        for sample in samples:
            for name, folder in (("vqa", repo / "vqa" / "fp32"), ("vqa-int8", repo / "vqa-int8")):
                got = stub.Classify(pb.ClassifyRequest(model=name, image=sample.image, text=sample.text), timeout=10)
                expected = reference_probs(folder, sample.image, sample.text)
                np.testing.assert_allclose(got.probabilities, expected, atol=1e-5)
