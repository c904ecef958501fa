"""`mmkd-serve --workers N` as real processes: the workers share one port and all answer, SIGTERM drains every
one and exits 0, a worker's death stops the set with exit 1, a port already in use is refused with exit 2."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import pytest

from server._proto.mmkd.v1 import inference_pb2 as pb
from server._proto.mmkd.v1 import inference_pb2_grpc as pb_grpc
from tiny_bundle import QUESTIONS, build_repository, make_image

REPO_ROOT = Path(__file__).resolve().parent.parent
WORKERS = 2


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return build_repository(tmp_path_factory.mktemp("repo"), ("tiny",))


def start_workers(repo: Path, *args: str) -> tuple[subprocess.Popen, list[dict]]:
    """Start the supervisor; returns it and every structured log line up to the last worker's 'serving'."""
    cmd = [sys.executable, "-m", "server.cli", "--model-repository", str(repo), "--port", "0", "--device", "cpu",
           "--workers", str(WORKERS), "--metrics-port", "0", *args]
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    events: list[dict] = []
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        if line.startswith("{"):
            events.append(json.loads(line))
            if sum(e["event"] == "serving" for e in events) == WORKERS:
                return proc, events
    proc.kill()
    raise AssertionError(f"workers did not start: {events} {proc.stderr.read()}")


def requests_counted(metrics_port: int) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("mmkd_requests_total{") and 'model="tiny"' in line)


def test_workers_share_one_port_every_one_answers_and_sigterm_drains_all(repo):
    proc, events = start_workers(repo)
    try:
        ports = {e["port"] for e in events if e["event"] == "serving"}
        assert len(ports) == 1, f"workers must share one port, got {ports}"
        port = ports.pop()
        metrics = [e["metrics_port"] for e in events if e["event"] == "listening"]
        assert len(set(metrics)) == WORKERS
        # The kernel spreads connections: 16 of them all landing on one of 2 workers has odds 2^-15.
        options = [("grpc.use_local_subchannel_pool", 1)]
        channels = [grpc.insecure_channel(f"127.0.0.1:{port}", options=options) for _ in range(16)]
        for i, channel in enumerate(channels):
            reply = pb_grpc.InferenceStub(channel).Classify(
                pb.ClassifyRequest(model="tiny", image=make_image(i), text=QUESTIONS[i % 5]), timeout=10)
            assert reply.label
        counts = [requests_counted(m) for m in metrics]
        assert sum(counts) == 16 and all(c > 0 for c in counts), f"requests per worker: {counts}"
        for channel in channels:
            channel.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        rest = [json.loads(line) for line in proc.stderr.read().splitlines() if line.startswith("{")]
        assert sum(e["event"] == "stopped" for e in rest) == WORKERS
        assert rest[-1]["event"] == "workers_stopped" and rest[-1]["codes"] == [0] * WORKERS
    finally:
        if proc.poll() is None:
            proc.kill()


def test_a_dying_worker_stops_the_others_and_the_supervisor_exits_1(repo):
    proc, events = start_workers(repo)
    try:
        pids = next(e["pids"] for e in events if e["event"] == "workers_started")
        os.kill(pids[0], signal.SIGKILL)
        assert proc.wait(timeout=30) == 1
        rest = [json.loads(line) for line in proc.stderr.read().splitlines() if line.startswith("{")]
        assert any(e["event"] == "worker_exited" and e["pid"] == pids[0] for e in rest)
        with pytest.raises(ProcessLookupError):  # the survivor drained and exited: nothing serves half the set
            os.kill(pids[1], 0)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_a_port_in_use_is_refused_with_exit_2_before_any_worker_starts(repo):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "server.cli", "--model-repository", str(repo), "--port",
                               str(port), "--workers", "2", "--log-format", "text"],
                              cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert f"cannot bind 127.0.0.1:{port}" in done.stderr and "workers_started" not in done.stderr
