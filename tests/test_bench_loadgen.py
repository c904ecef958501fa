"""The load generator against real loopback echo servers: counts requests and errors by code, balances replicas."""

from __future__ import annotations

import asyncio
import os
from collections import Counter

import grpc
import pytest

from benchmarks.loadgen import LoadPlan, channel_target, error_code, spawn, write_payloads
from benchmarks.procs import start_echo
from benchmarks.samples import Sample, synthetic_samples
from server._proto.mmkd.v1 import inference_pb2 as pb
from server._proto.mmkd.v1 import inference_pb2_grpc as pb_grpc


ECHO_PIDS: list[int] = []  # process group of each echo server, for CPU accounting


@pytest.fixture(scope="module")
def echoes(tmp_path_factory):
    logs = tmp_path_factory.mktemp("logs")
    procs = [start_echo(logs, 5, name=f"echo{i}") for i in range(2)]
    ECHO_PIDS[:] = [proc.pid for proc, _ in procs]
    yield [address for _, address in procs]
    for proc, _ in procs:
        assert proc.stop() == 0  # SIGTERM is a clean shutdown


def test_open_loop_counts_every_arrival_and_errors_by_code(echoes, tmp_path):
    good = synthetic_samples(1, 16)[0]
    payloads = write_payloads([good, Sample(good.image, "")], tmp_path / "p.jsonl")  # every 2nd: empty text
    plan = LoadPlan(targets=(echoes[0],), model="m", concurrency=(), rates=(100.0,), duration_s=1.0, warmup_s=0.3)
    (row,) = spawn(plan, payloads)  # the load runs in its own process
    assert row["shape"] == "open" and row["rate"] == 100.0
    assert 99 <= row["ok"] + row["error_count"] <= 101  # rate x window, no request lost or double counted
    assert set(row["errors"]) == {"INVALID_ARGUMENT"} and abs(row["ok"] - row["errors"]["INVALID_ARGUMENT"]) <= 1
    assert 0 < row["p50_ms"] <= row["p99_ms"] < 1000


def test_closed_loop_rows_per_concurrency(echoes, tmp_path):
    payloads = write_payloads(synthetic_samples(4, 16), tmp_path / "p.jsonl")
    plan = LoadPlan(targets=(echoes[0],), model="m", concurrency=(1, 8), duration_s=0.5, warmup_s=0.2,
                    server_groups=(ECHO_PIDS[0],))
    rows = spawn(plan, payloads)
    assert [r["concurrency"] for r in rows] == [1, 8]
    for row in rows:
        assert row["error_count"] == 0 and row["ok"] > 10
        assert row["throughput"] == pytest.approx(row["ok"] / row["duration_s"])
        # where the time went: both sides did work for every answer, neither used more cores than exist
        assert 0 < row["server_cpu_ms"] < 100 and 0 < row["client_cpu_ms"] < 100
        assert 0 < row["server_cores"] <= os.cpu_count() + 0.1 and 0 < row["client_cores"] <= os.cpu_count() + 0.1


def test_round_robin_spreads_requests_over_replicas(echoes):
    target, options = channel_target(echoes)
    assert target.startswith("ipv4:") and ("grpc.lb_policy_name", "round_robin") in options

    async def answered_by() -> Counter:
        async with grpc.aio.insecure_channel(target, options=options) as channel:
            await channel.channel_ready()
            stub = pb_grpc.InferenceStub(channel)
            sample = synthetic_samples(1, 16)[0]
            replies = [await stub.Classify(pb.ClassifyRequest(model="m", image=sample.image, text="q"))
                       for _ in range(20)]
            return Counter(r.model for r in replies)

    seen = asyncio.run(answered_by())
    assert set(seen) == {"echo0", "echo1"} and sum(seen.values()) == 20


def test_error_code_names_grpc_status():
    class Fake(Exception):
        def code(self):
            return grpc.StatusCode.RESOURCE_EXHAUSTED

    assert error_code(Fake()) == "RESOURCE_EXHAUSTED"
    assert error_code(ValueError("x")) == "ValueError"


def test_channels_open_that_many_connections_and_take_turns():
    # `--channels K` is what `mmkd-serve --workers N` needs: the kernel balances connections, not requests.
    from benchmarks.echo import EchoServicer
    from benchmarks.loadgen import mmkd_sender

    class PeerRecorder(EchoServicer):
        def __init__(self) -> None:
            super().__init__(num_labels=5)
            self.peers: list[str] = []

        async def Classify(self, request, context):
            self.peers.append(context.peer())  # ipv4:127.0.0.1:<client port>: one per connection
            return await super().Classify(request, context)

    async def main():
        servicer = PeerRecorder()
        server = grpc.aio.server()
        pb_grpc.add_InferenceServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        send, close = await mmkd_sender(LoadPlan(targets=(f"127.0.0.1:{port}",), model="m", channels=3))
        sample = synthetic_samples(1, 16)[0]
        for _ in range(9):
            await send(sample)
        await close()
        await server.stop(None)
        return servicer.peers

    peers = asyncio.run(main())
    assert len(set(peers)) == 3 and Counter(peers).most_common(1)[0][1] == 3


def test_the_spawned_process_runs_exactly_the_plan_it_was_given(tmp_path):
    # Every LoadPlan field must survive the command line to the load process (--channels once did not).
    from benchmarks.loadgen import build_parser, command_args, plan_from_args

    plan = LoadPlan(targets=("127.0.0.1:1", "127.0.0.1:2"), model="m", api="kserve", concurrency=(2, 5),
                    rates=(10.0, 20.5), duration_s=1.5, warmup_s=0.25, timeout_s=3.0, max_outstanding=99,
                    kserve_shape=(1, 2), server_groups=(11, 12), channels=7)
    args = build_parser().parse_args(command_args(plan, tmp_path / "p.jsonl", tmp_path / "o.json"))
    assert plan_from_args(args) == plan
