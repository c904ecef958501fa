"""Security over loopback: TLS with a self-signed certificate made here, bearer-token auth on BOTH APIs (own and
KServe v2, unary and streaming, through tritonclient too), health open or closed by a flag, message-size limits,
and no pickle on any load path."""

from __future__ import annotations

import inspect
import re
import shutil
import subprocess
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from grpc_health.v1 import health_pb2, health_pb2_grpc

from benchmarks.robustness import corpus
from benchmarks.robustness import images as im
from server import auth
from server._proto.kserve.v2 import grpc_service_pb2 as kpb
from server._proto.kserve.v2 import grpc_service_pb2_grpc as kserve_grpc
from server._proto.mmkd.v1 import inference_pb2 as pb
from server._proto.mmkd.v1 import inference_pb2_grpc as pb_grpc
from server.settings import ServerSettings
from tiny_bundle import ServerThread, build_repository, settings_for

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "tok-" + "9" * 40
GOOD = (("authorization", f"Bearer {TOKEN}"),)
BAD_METADATA = {"none": (), "wrong": (("authorization", "Bearer nope"),), "no scheme": (("authorization", TOKEN),),
                "lowercase scheme": (("authorization", f"bearer {TOKEN}"),),
                "prefix of the token": (("authorization", f"Bearer {TOKEN[:-1]}"),),
                "token plus junk": (("authorization", f"Bearer {TOKEN}0"),),
                "two headers": (("authorization", "Bearer nope"), ("authorization", f"Bearer {TOKEN}"))}
IMAGE = im.rgb(3)


def make_cert(folder: Path, name: str = "localhost") -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("the openssl binary is needed to make a test certificate")
    cert, key = folder / f"{name}.pem", folder / f"{name}.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-days", "1", "-subj", f"/CN={name}", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True, timeout=60)
    return cert, key


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return build_repository(tmp_path_factory.mktemp("repo"), ("tiny",))


@pytest.fixture(scope="module")
def cert(tmp_path_factory):
    return make_cert(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def secure(repo, cert, tmp_path_factory):
    tokens = tmp_path_factory.mktemp("auth") / "tokens"
    tokens.write_text(f"{TOKEN}\n")
    with ServerThread(settings_for(repo, tls_cert=cert[0], tls_key=cert[1], auth_token_file=tokens,
                                   max_message_bytes=1_000_000)) as srv:
        yield srv


def channel_to(srv, cert_path: Path) -> grpc.Channel:
    return grpc.secure_channel(srv.address, grpc.ssl_channel_credentials(root_certificates=cert_path.read_bytes()))


def calls(channel: grpc.Channel):
    """Every inference and discovery call of both APIs, as name -> f(metadata)."""
    v1, ks = pb_grpc.InferenceStub(channel), kserve_grpc.GRPCInferenceServiceStub(channel)
    classify = corpus.classify("tiny", IMAGE, corpus.GOOD_TEXT)
    return {
        "Classify": lambda md: v1.Classify(classify, metadata=md, timeout=10),
        "ClassifyStream": lambda md: list(v1.ClassifyStream(iter([classify, classify]), metadata=md, timeout=10)),
        "ListModels": lambda md: v1.ListModels(pb.ListModelsRequest(), metadata=md, timeout=10),
        "ModelInfer": lambda md: ks.ModelInfer(corpus.infer("tiny", [IMAGE], [b"is there a circle"]), metadata=md,
                                               timeout=10),
        "ModelMetadata": lambda md: ks.ModelMetadata(kpb.ModelMetadataRequest(name="tiny"), metadata=md, timeout=10),
        "ServerLive": lambda md: ks.ServerLive(kpb.ServerLiveRequest(), metadata=md, timeout=10),
    }


@pytest.mark.parametrize("method", ["Classify", "ClassifyStream", "ListModels", "ModelInfer", "ModelMetadata",
                                    "ServerLive"])
@pytest.mark.parametrize("why", sorted(BAD_METADATA))
def test_every_api_call_without_a_valid_token_is_unauthenticated(secure, cert, method, why):
    with channel_to(secure, cert[0]) as channel, pytest.raises(grpc.RpcError) as err:
        calls(channel)[method](BAD_METADATA[why])
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "authorization: Bearer" in err.value.details()


@pytest.mark.parametrize("method", ["Classify", "ClassifyStream", "ListModels", "ModelInfer", "ModelMetadata",
                                    "ServerLive"])
def test_every_api_call_with_the_token_over_tls_is_served(secure, cert, method):
    with channel_to(secure, cert[0]) as channel:
        assert calls(channel)[method](GOOD)


def test_tritonclient_over_tls_with_a_bearer_header(secure, cert):
    client = triton.InferenceServerClient(secure.address, ssl=True, root_certificates=str(cert[0]))
    image = triton.InferInput("image", [1, 1], "BYTES")
    image.set_data_from_numpy(np.array([[IMAGE]], dtype=object))
    text = triton.InferInput("text", [1, 1], "BYTES")
    text.set_data_from_numpy(np.array([[b"is there a circle"]], dtype=object))
    result = client.infer("tiny", [image, text], headers={"authorization": f"Bearer {TOKEN}"})
    assert result.as_numpy("logits").shape == (1, 5)
    with pytest.raises(triton.InferenceServerException) as err:
        client.infer("tiny", [image, text], headers={"authorization": "Bearer wrong"})
    assert "UNAUTHENTICATED" in str(err.value.status())
    client.close()


def test_a_client_trusting_another_ca_refuses_the_server(secure, tmp_path):
    other, _ = make_cert(tmp_path, "other")
    with channel_to(secure, other) as channel, pytest.raises(grpc.RpcError) as err:
        calls(channel)["Classify"](GOOD)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_plaintext_to_tls_port_never_reaches_a_handler(secure):
    with grpc.insecure_channel(secure.address) as channel, pytest.raises(grpc.RpcError) as err:
        calls(channel)["ModelInfer"](GOOD)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_health_is_open_by_default_and_closed_with_auth_health(repo, secure, cert, tmp_path):
    with channel_to(secure, cert[0]) as channel:
        assert health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status == \
            health_pb2.HealthCheckResponse.SERVING
    tokens = tmp_path / "tokens"
    tokens.write_text(TOKEN)
    with ServerThread(settings_for(repo, auth_token_file=tokens, auth_health=True)) as srv, \
            grpc.insecure_channel(srv.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            health.Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert health.Check(health_pb2.HealthCheckRequest(), metadata=GOOD, timeout=5).status == \
            health_pb2.HealthCheckResponse.SERVING


def test_an_oversized_message_is_refused_on_both_apis_and_the_server_goes_on(secure, cert):
    big = IMAGE + b"\0" * 1_100_000  # over max_message_bytes=1_000_000
    with channel_to(secure, cert[0]) as channel:
        v1, ks = pb_grpc.InferenceStub(channel), kserve_grpc.GRPCInferenceServiceStub(channel)
        for send in (lambda: v1.Classify(corpus.classify("tiny", big, "hi"), metadata=GOOD, timeout=10),
                     lambda: ks.ModelInfer(corpus.infer("tiny", [big], [b"hi"]), metadata=GOOD, timeout=10)):
            with pytest.raises(grpc.RpcError) as err:
                send()
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert calls(channel)["Classify"](GOOD).label


def test_tokens_are_compared_in_constant_time():
    source = inspect.getsource(auth.BearerTokenInterceptor._allowed)
    assert "hmac.compare_digest" in source
    assert not re.search(r"presented\s*(==|!=|in)\s", source), "a plain comparison leaks timing"
    interceptor = auth.BearerTokenInterceptor((b"abc", b"defgh"))
    assert interceptor._allowed((("authorization", "Bearer defgh"),))
    assert not interceptor._allowed((("authorization", "Bearer abcd"),))


def test_limits_and_their_defaults_are_documented():
    readme = (ROOT / "server" / "README.md").read_text()
    s = ServerSettings(model_repository=Path("."))
    assert s.max_image_bytes == 8 * 1024 * 1024 and "`--max-image-bytes` (8 MiB)" in readme
    assert s.max_image_pixels == 4096 * 4096 and "`--max-image-pixels` (4096x4096" in readme
    assert s.max_text_chars == 1024 and "`--max-text-chars` (1024)" in readme
    assert s.max_message_bytes == 16 * 1024 * 1024 and "`--max-message-bytes` (16 MiB)" in readme


PICKLE_PATTERNS = {
    "import pickle": re.compile(r"^\s*(import|from)\s+(c?pickle|dill|cloudpickle|joblib|shelve|marshal)\b", re.M),
    "pickle.load": re.compile(r"\b(c?pickle|dill|cloudpickle|joblib|shelve|marshal)\.loads?\("),
    "np.load allow_pickle": re.compile(r"allow_pickle\s*=\s*True"),
}
TORCH_LOAD = re.compile(r"torch\.load\(([^()]|\([^()]*\))*\)", re.S)


def test_no_load_path_unpickles():
    """Checkpoints are safetensors, bundles ONNX + JSON: nothing in distill/, export/ or server/ unpickles, and a
    torch.load (if one is ever unavoidable) must pass weights_only=True."""
    problems = []
    for folder in ("distill", "export", "server"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            text = path.read_text()
            problems += [f"{path.relative_to(ROOT)}: {name}" for name, rx in PICKLE_PATTERNS.items()
                         if rx.search(text)]
            problems += [f"{path.relative_to(ROOT)}: {m.group(0)[:80]}" for m in TORCH_LOAD.finditer(text)
                         if "weights_only=True" not in m.group(0)]
    assert not problems, problems
