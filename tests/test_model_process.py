"""`--instance-kind process`: batches prepared and computed in a model process of their own, over real loopback
gRPC: the same answers as in-process ONNX Runtime, a crashed model process costing one batch and coming back,
and no process left behind after shutdown or a killed server. (A malformed request failing alone across the pipe:
tests/test_server.py.)"""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
import numpy as np
import pytest

from export.bundle import ImageDecodeError, InputError, InputLimits, TextTooLongError
from server._proto.mmkd.v1 import inference_pb2_grpc as pb_grpc
from server.errors import ModelLoadError
from server.model import Raw
from server.model_process import ModelProcess
from server.runtime import Device
from test_server import classify
from tiny_bundle import QUESTIONS, ServerThread, build_repository, make_image, reference_probs, settings_for


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return build_repository(tmp_path_factory.mktemp("repo"), ("tiny",))


def _processes(srv: ServerThread):
    return [p for group in srv.server.engine._processes for p in group.processes]


def _alive(pid: int) -> bool:
    """Running, not exited (a zombie waiting for a parent that is gone counts as exited)."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            return not any(line.startswith("State:") and "Z" in line.split()[1] for line in fh)
    except FileNotFoundError:
        return False


def _concurrent(stub, n: int = 12) -> list:
    with ThreadPoolExecutor(n) as pool:
        futures = [pool.submit(classify, stub, seed=i, text=QUESTIONS[i % 5]) for i in range(n)]
        return [f.result() for f in futures]


def test_batches_in_a_model_process_give_in_process_answers_and_the_process_ends_with_the_server(repo):
    settings = settings_for(repo, instance_kind="process", max_batch_size=16, max_queue_delay_ms=100,
                            eager_dispatch=False)
    with ServerThread(settings) as srv, grpc.insecure_channel(srv.address) as ch:
        (process,) = _processes(srv)
        pid = process.pid
        assert pid not in (None, os.getpid()) and _alive(pid)
        answers = _concurrent(pb_grpc.InferenceStub(ch))
    for i, answer in enumerate(answers):
        np.testing.assert_allclose(answer.probabilities, reference_probs(repo / "tiny", make_image(i),
                                                                         QUESTIONS[i % 5]), atol=1e-5)
    assert max(a.timings.batch_size for a in answers) > 1, "the 100 ms delay should have batched the requests"
    deadline = time.monotonic() + 10
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(pid), "the model process outlived the server"


def test_a_killed_model_process_fails_one_batch_then_comes_back(repo):
    settings = settings_for(repo, instance_kind="process", max_batch_size=16, max_queue_delay_ms=100,
                            eager_dispatch=False)
    with ServerThread(settings) as srv, grpc.insecure_channel(srv.address) as ch:
        stub = pb_grpc.InferenceStub(ch)
        (process,) = _processes(srv)
        old_pid = process.pid
        os.kill(old_pid, signal.SIGKILL)
        with ThreadPoolExecutor(4) as pool:  # a batch of several: batches of one run in the server itself
            futures = [pool.submit(classify, stub, seed=i) for i in range(4)]
            outcomes = []
            for f in futures:
                try:
                    outcomes.append(f.result())
                except grpc.RpcError as exc:
                    outcomes.append(exc)
        failed = [o for o in outcomes if isinstance(o, grpc.RpcError)]
        assert failed, "the batch sent to the dead process should have failed"
        assert all(e.code() == grpc.StatusCode.INTERNAL and "died" in e.details() for e in failed)
        answers = _concurrent(stub, 8)  # the next batches go to a new process
        assert process.pid not in (None, old_pid) and _alive(process.pid)
        assert srv.metric("mmkd_model_process_deaths_total", {"model": "tiny"}) == 1.0
    assert max(a.timings.batch_size for a in answers) > 1
    np.testing.assert_allclose(answers[0].probabilities,
                               reference_probs(repo / "tiny", make_image(0), QUESTIONS[0]), atol=1e-5)


def test_auto_puts_only_models_cheaper_than_their_preprocessing_in_processes(repo):
    # The tiny model computes in microseconds, far less than decoding its request: auto gives it a process;
    # --preprocess-in loop (the event loop prepares) leaves nothing for a process to take over, and neither does
    # --max-batch-size 1, whose batches of one run on the server's own copy.
    with ServerThread(settings_for(repo)) as srv:
        assert len(_processes(srv)) == 1
    with ServerThread(settings_for(repo, preprocess_in="loop")) as srv:
        assert _processes(srv) == []
    with ServerThread(settings_for(repo, instance_kind="thread")) as srv:
        assert _processes(srv) == []
    with ServerThread(settings_for(repo, max_batch_size=1)) as srv:  # batching off: every batch runs in the server
        assert _processes(srv) == []
    with ServerThread(settings_for(repo, instance_kind="process", instances=2)) as srv:
        assert len({p.pid for p in _processes(srv)}) == 2


def test_a_bundle_the_model_process_cannot_load_is_a_model_load_error(tmp_path):
    with pytest.raises(ModelLoadError, match="model process failed to load") as err:
        ModelProcess("ghost", tmp_path / "missing", Device("cpu"), InputLimits(), intra_op_threads=1,
                     spinning=False, max_batch_size=4)
    assert "missing" in str(err.value)


def test_input_errors_cross_the_pipe_with_their_type_field_and_message():
    for exc in (InputError("text", "is empty"), ImageDecodeError("image[3]", "is not a decodable image"),
                TextTooLongError("text", "has 2,000 characters")):
        back = pickle.loads(pickle.dumps(exc))
        assert type(back) is type(exc) and back.field == exc.field and str(back) == str(exc)


def test_raw_requests_pickle_for_the_pipe():
    raw = Raw(make_image(1), "what color?", index=2)
    assert pickle.loads(pickle.dumps(raw)) == raw


def test_model_processes_exit_when_the_server_is_killed(repo):
    # SIGKILL gives the server no chance to close its model processes: each must notice the pipe's end closing
    # and exit by itself, not linger holding a model's memory.
    cmd = [sys.executable, "-m", "server.cli", "--model-repository", str(repo), "--port", "0", "--device", "cpu",
           "--instance-kind", "process"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                            cwd=Path(__file__).resolve().parents[1])
    pids: list[int] = []
    try:
        for line in proc.stderr:
            event = json.loads(line) if line.startswith("{") else {}
            pids += event.get("pids", []) if event.get("event") == "model_processes" else []
            if event.get("event") == "serving":
                break
        assert pids and all(_alive(pid) for pid in pids)
    finally:
        proc.kill()
        proc.wait(10)
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(pid) for pid in pids), "a model process outlived its killed server"


def test_a_model_process_that_cannot_restart_fails_its_batches_and_its_health_until_it_can(tmp_path):
    # The bundle broke on disk after the server loaded it, then the model process died: every batch for it
    # fails with INTERNAL naming why the process could not load, instead of hanging or crashing the server, and
    # the model reports NOT_SERVING until a process starts again.
    repo = build_repository(tmp_path / "repo", ("tiny",))
    settings = settings_for(repo, instance_kind="process", max_batch_size=16, max_queue_delay_ms=100,
                            eager_dispatch=False)
    with ServerThread(settings) as srv, grpc.insecure_channel(srv.address) as ch:
        stub = pb_grpc.InferenceStub(ch)
        (process,) = _processes(srv)
        (repo / "tiny" / "model.onnx").write_bytes(b"not an onnx graph")
        os.kill(process.pid, signal.SIGKILL)
        for _ in range(2):  # the batch that meets the dead process, then one that needs a new one
            with ThreadPoolExecutor(4) as pool:
                futures = [pool.submit(classify, stub, seed=i) for i in range(4)]
                errors = [f.exception() for f in futures]
            failed = [e for e in errors if e is not None]
            assert failed and all(e.code() == grpc.StatusCode.INTERNAL for e in failed)
        assert any("failed to load" in e.details() and "model.onnx" in e.details() for e in failed), \
            [e.details() for e in failed]
        health = health_pb2_grpc.HealthStub(ch)
        assert health.Check(health_pb2.HealthCheckRequest(service="tiny"), timeout=5).status == \
            health_pb2.HealthCheckResponse.NOT_SERVING
        assert srv.metric("mmkd_model_ready", {"model": "tiny"}) == 0.0
        build_repository(tmp_path / "fixed", ("tiny",))  # the bundle is repaired: the next batch starts a process
        (repo / "tiny" / "model.onnx").write_bytes((tmp_path / "fixed" / "tiny" / "model.onnx").read_bytes())
        answers = _concurrent(stub, 8)
        assert health.Check(health_pb2.HealthCheckRequest(service="tiny"), timeout=5).status == \
            health_pb2.HealthCheckResponse.SERVING
        assert srv.metric("mmkd_model_ready", {"model": "tiny"}) == 1.0
    assert max(a.timings.batch_size for a in answers) > 1
