"""TLS (a self-signed certificate made for the test) and bearer-token auth over loopback."""

from __future__ import annotations

import shutil
import subprocess

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from server._proto.mmkd.v1 import inference_pb2 as pb
from server._proto.mmkd.v1 import inference_pb2_grpc as pb_grpc
from server.auth import read_tokens
from server.errors import ConfigError
from tiny_bundle import ServerThread, build_repository, make_image, settings_for

TOKEN = "s3cret-token-for-tests"


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return build_repository(tmp_path_factory.mktemp("repo"), ("tiny",))


@pytest.fixture(scope="module")
def cert(tmp_path_factory):
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a test certificate")
    folder = tmp_path_factory.mktemp("tls")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
                    "-keyout", str(folder / "key.pem"), "-out", str(folder / "cert.pem")],
                   check=True, capture_output=True, timeout=60)
    return folder / "cert.pem", folder / "key.pem"


@pytest.fixture(scope="module")
def secure_server(repo, cert, tmp_path_factory):
    token_file = tmp_path_factory.mktemp("auth") / "tokens"
    token_file.write_text(f"# rotated tokens\nold-token\n{TOKEN}\n")
    settings = settings_for(repo, tls_cert=cert[0], tls_key=cert[1], auth_token_file=token_file)
    with ServerThread(settings) as srv:
        yield srv


def secure_stub(srv, cert_path):
    creds = grpc.ssl_channel_credentials(root_certificates=cert_path.read_bytes())
    channel = grpc.secure_channel(srv.address, creds)
    return channel, pb_grpc.InferenceStub(channel)


def request() -> pb.ClassifyRequest:
    return pb.ClassifyRequest(model="tiny", image=make_image(0), text="is there a circle")


def test_tls_with_a_valid_token_is_served(secure_server, cert):
    channel, stub = secure_stub(secure_server, cert[0])
    with channel:
        for token in (TOKEN, "old-token"):
            response = stub.Classify(request(), metadata=(("authorization", f"Bearer {token}"),), timeout=10)
            assert response.label


@pytest.mark.parametrize("metadata", [(), (("authorization", "Bearer wrong"),), (("authorization", TOKEN),),
                                      (("authorization", f"Bearer {TOKEN}x"),)])
def test_missing_or_invalid_token_is_unauthenticated(secure_server, cert, metadata):
    channel, stub = secure_stub(secure_server, cert[0])
    with channel, pytest.raises(grpc.RpcError) as err:
        stub.Classify(request(), metadata=metadata, timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "bearer token" in err.value.details()


def test_stream_without_token_is_unauthenticated(secure_server, cert):
    channel, stub = secure_stub(secure_server, cert[0])
    with channel, pytest.raises(grpc.RpcError) as err:
        list(stub.ClassifyStream(iter([request()]), timeout=10))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_health_stays_open_for_probes(secure_server, cert):
    channel, _ = secure_stub(secure_server, cert[0])
    with channel:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status
    assert status == health_pb2.HealthCheckResponse.SERVING


def test_plaintext_client_cannot_talk_to_a_tls_server(secure_server):
    with grpc.insecure_channel(secure_server.address) as channel, pytest.raises(grpc.RpcError) as err:
        pb_grpc.InferenceStub(channel).Classify(request(), timeout=3)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_empty_token_file_is_refused(tmp_path):
    path = tmp_path / "tokens"
    path.write_text("# nothing\n\n")
    with pytest.raises(ConfigError, match="holds no token"):
        read_tokens(path)
