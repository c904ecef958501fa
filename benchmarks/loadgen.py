"""The load generator: drives a gRPC server from its OWN process with grpc.aio and reports what clients see.

Two load shapes, both over a fixed measured window after a warm-up:

- closed loop: `concurrency` workers each send a request, wait for its answer, send the next. Measures the
  throughput a fixed number of in-flight requests sustains and the latency each one sees.
- open loop: requests arrive at a fixed rate whatever the server does; latency counts from the scheduled send
  time, so a server that falls behind shows it (no coordinated omission).

APIs: `mmkd` (the server's own `mmkd.v1.Inference/Classify`, also what the echo floor speaks) and `kserve`
(KServe v2 `ModelInfer` through `tritonclient.grpc.aio`, the client Triton users already have: used for the
PyTriton peer and for our server's KServe endpoint). Several `--target` addresses are balanced with gRPC's
`round_robin` policy on one channel. `--channels K` opens K connections and spreads requests over them, as K
clients would: what a `mmkd-serve --workers N` server needs, since the kernel balances connections.

    python -m benchmarks.loadgen --target 127.0.0.1:50051 --model student --payloads p.jsonl \\
        --concurrency 1,8,32 --rates 100,200 --duration 5 --out load.json
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from benchmarks.cpu import CpuSample, cpu_per_request
from benchmarks.samples import Sample

# One request; raises on failure, returns the server's own timings (mmkd API) or None.
Send = Callable[[Sample], Awaitable["dict[str, float] | None"]]
TIMING_FIELDS = ("preprocess_ms", "queue_ms", "compute_ms", "total_ms", "batch_size")


@dataclass(frozen=True)
class LoadPlan:
    """What one load-generator run does.

    >>> LoadPlan(targets=("127.0.0.1:1",), model="m").api
    'mmkd'
    """

    targets: tuple[str, ...]
    model: str
    api: str = "mmkd"  # mmkd | kserve
    concurrency: tuple[int, ...] = (1, 8, 32, 128)
    rates: tuple[float, ...] = ()
    duration_s: float = 5.0
    warmup_s: float = 1.0
    timeout_s: float = 30.0
    max_outstanding: int = 4096  # open loop: arrivals beyond this are counted as client_overload errors
    kserve_shape: tuple[int, ...] = (1, 1)  # BYTES tensor shape per request (Triton with batching: [1, 1])
    server_groups: tuple[int, ...] = ()  # process groups whose CPU seconds per request are reported
    channels: int = 1  # connections opened (clients, for kserve), requests spread over them in turn


# ------------------------------------------------------------------------------------------------------------
# Senders: one per API. Each returns (send, close).
# ------------------------------------------------------------------------------------------------------------


def channel_target(targets: Sequence[str]) -> tuple[str, list[tuple[str, object]]]:
    """One address as is; several as an ipv4 list with the round_robin policy (every backend gets requests)."""
    options: list[tuple[str, object]] = [("grpc.max_receive_message_length", 16 * 1024 * 1024),
                                         ("grpc.max_send_message_length", 16 * 1024 * 1024)]
    if len(targets) == 1:
        return targets[0], options
    addresses = ",".join(t.removeprefix("ipv4:") for t in targets)
    return f"ipv4:{addresses}", options + [("grpc.lb_policy_name", "round_robin")]


async def mmkd_sender(plan: LoadPlan):
    import grpc

    from server._proto.mmkd.v1 import inference_pb2 as pb
    from server._proto.mmkd.v1 import inference_pb2_grpc as pb_grpc

    target, options = channel_target(plan.targets)
    if plan.channels > 1:  # without a local pool, channels with equal arguments share one connection
        options = options + [("grpc.use_local_subchannel_pool", 1)]
    channels = [grpc.aio.insecure_channel(target, options=options) for _ in range(plan.channels)]
    await asyncio.wait_for(asyncio.gather(*(c.channel_ready() for c in channels)), timeout=plan.timeout_s)
    stubs = itertools.cycle([pb_grpc.InferenceStub(c) for c in channels])

    async def send(sample: Sample) -> dict[str, float] | None:
        reply = await next(stubs).Classify(pb.ClassifyRequest(model=plan.model, image=sample.image, text=sample.text,
                                                       top_k=5), timeout=plan.timeout_s)
        if not reply.HasField("timings"):
            return None
        return {name: float(getattr(reply.timings, name)) for name in TIMING_FIELDS}

    async def close() -> None:
        await asyncio.gather(*(c.close() for c in channels))

    return send, close


async def kserve_sender(plan: LoadPlan):
    import tritonclient.grpc.aio as tc

    if len(plan.targets) != 1:
        raise ValueError("the kserve API (tritonclient) takes exactly one --target")
    args = None  # tritonclient's own defaults for one client
    if plan.channels > 1:  # one client per connection; without a local pool they would share one connection
        args = [("grpc.max_send_message_length", 2**31 - 1), ("grpc.max_receive_message_length", 2**31 - 1),
                ("grpc.use_local_subchannel_pool", 1)]
    clients = [tc.InferenceServerClient(url=plan.targets[0], channel_args=args) for _ in range(plan.channels)]
    turn = itertools.cycle(clients)
    shape = list(plan.kserve_shape)

    async def send(sample: Sample) -> None:
        image = tc.InferInput("image", shape, "BYTES")
        image.set_data_from_numpy(np.array([sample.image], dtype=np.object_).reshape(shape))
        text = tc.InferInput("text", shape, "BYTES")
        text.set_data_from_numpy(np.array([sample.text.encode()], dtype=np.object_).reshape(shape))
        await next(turn).infer(plan.model, [image, text], outputs=[tc.InferRequestedOutput("logits")],
                           client_timeout=plan.timeout_s)

    async def close() -> None:
        await asyncio.gather(*(c.close() for c in clients))

    return send, close


def error_code(exc: BaseException) -> str:
    """A gRPC status name (e.g. 'UNAVAILABLE') for an exception from either client library."""
    code = getattr(exc, "code", None)
    if callable(code):
        code = code()
    if code is None and hasattr(exc, "status"):  # tritonclient's InferenceServerException
        status = exc.status()
        code = status if isinstance(status, str) else None
    name = getattr(code, "name", None) or (str(code) if code else type(exc).__name__)
    return name.removeprefix("StatusCode.")


# ------------------------------------------------------------------------------------------------------------
# Load shapes
# ------------------------------------------------------------------------------------------------------------


class Recorder:
    """Latencies of successful requests and error counts, inside the measured window only."""

    def __init__(self) -> None:
        self.latencies_ms: list[float] = []
        self.errors: Counter[str] = Counter()
        self.window: tuple[float, float] = (0.0, 0.0)
        self.server: dict[str, float] = dict.fromkeys(TIMING_FIELDS, 0.0)
        self.server_n = 0
        self.cpu: list[CpuSample] = []  # readings at the window's start and end

    def record(self, sent: float, done: float, error: str | None, timings: dict[str, float] | None = None) -> None:
        start, end = self.window
        if not start <= sent < end:
            return
        if error is None:
            self.latencies_ms.append((done - sent) * 1000.0)
        else:
            self.errors[error] += 1
        if timings:
            self.server_n += 1
            for name in TIMING_FIELDS:
                self.server[name] += timings.get(name, 0.0)

    def server_means(self) -> dict[str, float]:
        """Mean server-reported timings (where a request's time went), when the API reports them."""
        if not self.server_n:
            return {}
        means = {f"server_{k.removesuffix('_ms')}_ms": v / self.server_n for k, v in self.server.items()}
        means["server_batch"] = means.pop("server_batch_size_ms")
        return means

    def summary(self, **labels: object) -> dict:
        from benchmarks.latency import percentiles

        duration = self.window[1] - self.window[0]
        ok = len(self.latencies_ms)
        return {**labels, "duration_s": duration, "ok": ok, "errors": dict(self.errors),
                "error_count": sum(self.errors.values()), "throughput": ok / duration if duration > 0 else 0.0,
                **percentiles(self.latencies_ms), **self.server_means(),
                **(cpu_per_request(self.cpu[0], self.cpu[1], ok) if len(self.cpu) == 2 else {})}


async def meter_cpu(rec: Recorder, server_groups: Sequence[int]) -> None:
    """Read CPU seconds at the measured window's start and end, so warm-up and stragglers stay out."""
    await asyncio.sleep(max(0.0, rec.window[0] - time.perf_counter()))
    rec.cpu = [CpuSample.now(server_groups)]
    await asyncio.sleep(max(0.0, rec.window[1] - time.perf_counter()))
    rec.cpu.append(CpuSample.now(server_groups))


async def timed(send: Send, sample: Sample, sent: float, rec: Recorder) -> None:
    timings = None
    try:
        timings = await send(sample)
        error = None
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # every failure is a data point, counted by its status code
        error = error_code(exc)
    rec.record(sent, time.perf_counter(), error, timings)


async def closed_loop(send: Send, samples: Sequence[Sample], concurrency: int, plan: LoadPlan) -> dict:
    """`concurrency` workers back to back for warmup + duration; only requests sent in the window count."""
    rec = Recorder()
    start = time.perf_counter()
    rec.window = (start + plan.warmup_s, start + plan.warmup_s + plan.duration_s)
    metering = asyncio.create_task(meter_cpu(rec, plan.server_groups))

    async def worker(offset: int) -> None:
        i = offset
        while (now := time.perf_counter()) < rec.window[1]:
            await timed(send, samples[i % len(samples)], now, rec)
            i += concurrency

    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    await metering
    return rec.summary(shape="closed", concurrency=concurrency)


async def open_loop(send: Send, samples: Sequence[Sample], rate: float, plan: LoadPlan) -> dict:
    """Arrivals every 1/rate seconds for warmup + duration, each its own task; waits for stragglers."""
    rec = Recorder()
    start = time.perf_counter()
    rec.window = (start + plan.warmup_s, start + plan.warmup_s + plan.duration_s)
    metering = asyncio.create_task(meter_cpu(rec, plan.server_groups))
    tasks: set[asyncio.Task] = set()
    n = 0
    while (scheduled := start + n / rate) < rec.window[1]:
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if len(tasks) >= plan.max_outstanding:
            rec.record(scheduled, scheduled, "client_overload")
        else:
            task = asyncio.create_task(timed(send, samples[n % len(samples)], scheduled, rec))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        n += 1
    await metering
    if tasks:
        await asyncio.wait(tasks, timeout=plan.timeout_s)
    offered = rate
    return rec.summary(shape="open", rate=offered)


async def run_plan(plan: LoadPlan, samples: Sequence[Sample]) -> list[dict]:
    """Every closed-loop concurrency, then every open-loop rate, on one connection set-up."""
    make = mmkd_sender if plan.api == "mmkd" else kserve_sender
    send, close = await make(plan)
    try:
        rows = [await closed_loop(send, samples, c, plan) for c in plan.concurrency]
        rows += [await open_loop(send, samples, r, plan) for r in plan.rates]
    finally:
        result = close()
        if asyncio.iscoroutine(result):
            await result
    return rows


# ------------------------------------------------------------------------------------------------------------
# Payload files and the separate-process entry point
# ------------------------------------------------------------------------------------------------------------


def write_payloads(samples: Sequence[Sample], path: str | Path) -> Path:
    """JSONL with base64 images: how the parent hands the exact same payloads to the load process."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        for s in samples:
            fh.write(json.dumps({"image": base64.b64encode(s.image).decode(), "text": s.text}) + "\n")
    os.replace(tmp, path)
    return path


def read_payloads(path: str | Path) -> list[Sample]:
    with open(path, encoding="utf-8") as fh:
        return [Sample(base64.b64decode(row["image"]), row["text"]) for row in map(json.loads, fh) if row]


def spawn(plan: LoadPlan, payloads: Path, timeout_s: float | None = None, python: str = sys.executable) -> list[dict]:
    """Run the load generator in a fresh process and return its rows (the parent's CPU stays out of it)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "load.json"
        cmd = [python, "-m", "benchmarks.loadgen", *command_args(plan, payloads, out)]
        budget = timeout_s or (len(plan.concurrency) + len(plan.rates)) * (plan.duration_s + plan.warmup_s
                                                                            + plan.timeout_s) + 60
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=budget, cwd=_repo_root())
        if proc.returncode != 0:
            raise RuntimeError(f"load generator failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
        return json.loads(out.read_text())["rows"]


def command_args(plan: LoadPlan, payloads: Path, out: Path) -> list[str]:
    """The command line that makes `main` run `plan` (plan_from_args of its parse gives `plan` back)."""
    args = ["--model", plan.model, "--api", plan.api, "--payloads", str(payloads), "--out", str(out),
            "--concurrency", ",".join(map(str, plan.concurrency)), "--rates", ",".join(map(str, plan.rates)),
            "--duration", str(plan.duration_s), "--warmup", str(plan.warmup_s), "--timeout", str(plan.timeout_s),
            "--max-outstanding", str(plan.max_outstanding), "--kserve-shape", ",".join(map(str, plan.kserve_shape)),
            "--channels", str(plan.channels)]
    for target in plan.targets:
        args += ["--target", target]
    for group in plan.server_groups:
        args += ["--server-group", str(group)]
    return args


def _repo_root() -> str:
    return str(Path(__file__).resolve().parent.parent)


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(",") if x.strip())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.loadgen", description=__doc__.split("\n")[0])
    parser.add_argument("--target", action="append", required=True, help="HOST:PORT; repeat for round_robin")
    parser.add_argument("--model", required=True)
    parser.add_argument("--api", choices=("mmkd", "kserve"), default="mmkd")
    parser.add_argument("--payloads", required=True, help="JSONL from write_payloads()")
    parser.add_argument("--concurrency", type=_ints, default=(1, 8, 32, 128))
    parser.add_argument("--rates", type=_floats, default=(), help="open-loop arrival rates, requests/s")
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--timeout", type=float, default=30.0)
    parser.add_argument("--kserve-shape", type=_ints, default=(1, 1))
    parser.add_argument("--server-group", type=int, action="append", default=[],
                        help="process group id of a server under test: report its CPU ms per request; repeatable")
    parser.add_argument("--channels", type=int, default=1,
                        help="connections to open, requests spread over them in turn (default 1)")
    parser.add_argument("--max-outstanding", type=int, default=LoadPlan.max_outstanding,
                        help="open loop: arrivals beyond this many in flight count as client_overload errors")
    parser.add_argument("--out", required=True)
    return parser


def plan_from_args(args: argparse.Namespace) -> LoadPlan:
    return LoadPlan(targets=tuple(args.target), model=args.model, api=args.api, concurrency=args.concurrency,
                    rates=args.rates, duration_s=args.duration, warmup_s=args.warmup, timeout_s=args.timeout,
                    max_outstanding=args.max_outstanding, kserve_shape=args.kserve_shape,
                    server_groups=tuple(args.server_group), channels=args.channels)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    plan = plan_from_args(args)
    rows = asyncio.run(run_plan(plan, read_payloads(args.payloads)))
    out = Path(args.out)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps({"plan": asdict(plan), "rows": rows}, indent=2))
    os.replace(tmp, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
