"""`mmkd-predict`: JSON for one request, JSON lines for a file of many, and round_robin over several servers."""

from __future__ import annotations

import json

import pytest

from server.predict import channel_target, main
from tiny_bundle import QUESTIONS, ServerThread, build_repository, make_image, settings_for


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return build_repository(tmp_path_factory.mktemp("repo"), ("tiny",))


@pytest.fixture(scope="module")
def two_servers(repo):
    with ServerThread(settings_for(repo)) as a, ServerThread(settings_for(repo)) as b:
        yield a, b


def test_channel_target():
    assert channel_target("127.0.0.1:5000") == "127.0.0.1:5000"
    assert channel_target("127.0.0.1:1,127.0.0.1:2") == "ipv4:127.0.0.1:1,127.0.0.1:2"
    assert channel_target("localhost:7, 127.0.0.1:8").startswith(("ipv4:127.0.0.1:7,", "ipv6:[::1]:7,"))
    with pytest.raises(ValueError, match="HOST:PORT"):
        channel_target("a,b")


def test_single_request_prints_json(two_servers, tmp_path, capsys):
    image = tmp_path / "x.png"
    image.write_bytes(make_image(3))
    rc = main(["--server", two_servers[0].address, "--model", "tiny", "--image", str(image), "--text", QUESTIONS[0],
               "--top-k", "2"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["model"] == "tiny" and len(out["top"]) == 2 and out["label"] == out["top"][0]["label"]


def test_requests_file_round_robins_over_two_servers(two_servers, tmp_path, capsys):
    a, b = two_servers
    lines = []
    for i in range(20):
        (tmp_path / f"{i}.png").write_bytes(make_image(i))
        lines.append(json.dumps({"image": f"{i}.png", "text": QUESTIONS[i % 5], "id": f"q{i}"}))
    lines.append(json.dumps({"image": "0.png", "text": "  ", "id": "empty"}))
    (tmp_path / "reqs.jsonl").write_text("\n".join(lines) + "\n")
    before = [s.metric("mmkd_requests_total", {"model": "tiny", "api": "mmkd.v1", "code": "OK"}) for s in (a, b)]
    rc = main(["--server", f"{a.address},{b.address}", "--model", "tiny", "--requests", str(tmp_path / "reqs.jsonl"),
               "--concurrency", "8"])
    results = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["id"] for r in results] == [f"q{i}" for i in range(20)] + ["empty"]
    assert all("label" in r for r in results[:20])
    assert results[-1]["error"]["code"] == "INVALID_ARGUMENT" and rc == 1
    served = [s.metric("mmkd_requests_total", {"model": "tiny", "api": "mmkd.v1", "code": "OK"}) - n
              for s, n in zip((a, b), before)]
    assert sum(served) == 20 and min(served) >= 5, f"round_robin should use both servers, got {served}"


def test_no_input_is_a_usage_error(capsys):
    assert main(["--model", "tiny"]) == 2
    assert "--requests" in capsys.readouterr().err


def test_the_callers_own_mistakes_are_messages_not_tracebacks(tmp_path, capsys):
    image = tmp_path / "x.png"
    image.write_bytes(make_image())
    empty = tmp_path / "token"
    empty.write_text("\n")
    cases = [(["--image", str(tmp_path / "missing.png"), "--text", "q"], "missing.png"),
             (["--image", str(image), "--text", "q", "--token-file", str(empty)], "token file"),
             (["--image", str(image), "--text", "q", "--tls-ca", str(tmp_path / "ca.pem")], "ca.pem"),
             (["--image", str(image), "--text", "q", "--server", "nohostport,10.0.0.1:1"], "not HOST:PORT")]
    for args, named in cases:
        assert main(["--model", "tiny", *args]) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("mmkd-predict: ") and named in err, err
