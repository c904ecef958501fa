"""`mmkd-serve` as a real process: SIGTERM during 50 in-flight requests answers all 50 and exits 0; bad settings
exit 2 with a message; the process never imports torch or transformers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from server._proto.mmkd.v1 import inference_pb2 as pb
from server._proto.mmkd.v1 import inference_pb2_grpc as pb_grpc
from tiny_bundle import QUESTIONS, build_repository, make_image

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return build_repository(tmp_path_factory.mktemp("repo"), ("tiny",))


def start_server(repo: Path, *args: str) -> tuple[subprocess.Popen, dict]:
    """Run `python -m server.cli` and wait for its structured 'serving' log line; returns (process, that line)."""
    cmd = [sys.executable, "-m", "server.cli", "--model-repository", str(repo), "--port", "0", "--device", "cpu", *args]
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + 60
    seen: dict = {}
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        if line.startswith("{"):
            seen.update(json.loads(line))
            if seen["event"] == "serving":
                return proc, seen
    proc.kill()
    raise AssertionError(f"server did not start: {proc.stderr.read()}")


def test_sigterm_during_50_in_flight_requests_answers_all_and_exits_0(repo):
    # A long batch delay keeps all 50 requests in flight when SIGTERM arrives.
    proc, serving = start_server(repo, "--max-batch-size", "64", "--max-queue-delay-ms", "1500", "--no-eager-dispatch", "--metrics-port", "0")
    address = f"127.0.0.1:{serving['port']}"
    try:
        with grpc.insecure_channel(address) as channel:
            stub = pb_grpc.InferenceStub(channel)
            stub.Classify(pb.ClassifyRequest(model="tiny", image=make_image(0), text="is there a circle"), timeout=10)
            with ThreadPoolExecutor(50) as pool:
                futures = [pool.submit(stub.Classify, pb.ClassifyRequest(model="tiny", image=make_image(i),
                                                                         text=QUESTIONS[i % 5]), timeout=30)
                           for i in range(50)]
                wait_for_queue_depth(serving["metrics_port"], 50, timeout=10)
                assert not any(f.done() for f in futures), "requests finished before SIGTERM: test is not testing"
                proc.send_signal(signal.SIGTERM)
                responses = [f.result() for f in futures]
        assert len(responses) == 50 and all(r.label for r in responses)
        assert proc.wait(timeout=30) == 0
        events = [json.loads(line).get("event") for line in proc.stderr.read().splitlines() if line.startswith("{")]
        assert "signal_received" in events and events[-1] == "stopped"
    finally:
        if proc.poll() is None:
            proc.kill()


def wait_for_queue_depth(metrics_port: int, depth: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
        if f'mmkd_queue_depth{{model="tiny"}} {float(depth)}' in text:
            return
        time.sleep(0.02)
    raise AssertionError(f"queue never reached {depth} requests")


def test_sigint_with_no_traffic_exits_0_quickly(repo):
    proc, _ = start_server(repo)
    try:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_bad_settings_exit_2_with_a_message(repo):
    result = subprocess.run([sys.executable, "-m", "server.cli", "--model-repository", str(repo),
                             "--max-batch-size", "0", "--device", "tpu"], cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2
    assert "max_batch_size" in result.stderr and "device" in result.stderr


def test_missing_model_exits_1_naming_what_the_repository_holds(repo):
    result = subprocess.run([sys.executable, "-m", "server.cli", "--model-repository", str(repo), "--port", "0",
                             "--model", "nope"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "nope" in result.stderr and "tiny" in result.stderr


def test_server_process_imports_neither_torch_nor_transformers(repo):
    code = ("import sys, server.cli, server.predict, server.app, server.protogen; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers')))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_port_in_use_exits_2_with_a_message(repo):
    proc, serving = start_server(repo)
    try:
        result = subprocess.run([sys.executable, "-m", "server.cli", "--model-repository", str(repo), "--port",
                                 str(serving["port"])], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
        assert result.returncode == 2
        assert "cannot bind" in result.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
