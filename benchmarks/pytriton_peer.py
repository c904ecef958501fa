"""The real peer: the same student bundle served by PyTriton (Triton's core and dynamic batcher, the bound Python
function running the bundle's own preprocessing and ONNX Runtime), driven by the same load shape through
`tritonclient` (the KServe v2 API), exactly like our server's KServe endpoint.

PyTriton pins numpy < 2 and needs LD_LIBRARY_PATH pointed at the running Python's `lib` folder, so it lives in
its OWN virtual environment (`.venv-pytriton/`, created on demand: `python3 -m venv` + pip), never touching the
project's pins. This file is both sides: the harness (`bench_peer`, project venv) and the server
(`python -m benchmarks.pytriton_peer --bundle DIR`, peer venv; imports only numpy, onnxruntime, pillow,
tokenizers and `export.bundle`).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PEER_VENV = REPO_ROOT / ".venv-pytriton"
PEER_PACKAGES = ("nvidia-pytriton", "onnxruntime", "numpy<2", "pillow", "tokenizers")


# ------------------------------------------------------------------------------------------------------------
# Harness side (project venv)
# ------------------------------------------------------------------------------------------------------------


def ensure_peer_venv(venv: Path = PEER_VENV, progress: Callable[[str], None] = print) -> Path:
    """The peer venv's python, creating the venv and installing PyTriton the first time."""
    from benchmarks.errors import PeerUnavailable

    python = venv / "bin" / "python"
    if python.is_file() and _imports_pytriton(python):
        return python
    progress(f"  creating {venv} for PyTriton (one time; pip install {' '.join(PEER_PACKAGES)})")
    base = Path(getattr(sys, "_base_executable", sys.executable))
    steps = [[str(base), "-m", "venv", str(venv)],
             [str(python), "-m", "pip", "install", "--quiet", *PEER_PACKAGES]]
    for cmd in steps:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
        if proc.returncode != 0:
            raise PeerUnavailable(f"`{' '.join(cmd)}` failed: {proc.stderr[-1500:]}")
    if not _imports_pytriton(python):
        raise PeerUnavailable(f"pytriton does not import in {venv} after installing it")
    return python


def _imports_pytriton(python: Path) -> bool:
    proc = subprocess.run([str(python), "-c", "import pytriton.triton"], capture_output=True,
                          env=peer_env(python), timeout=120)
    return proc.returncode == 0


def peer_env(python: Path) -> dict[str, str]:
    """LD_LIBRARY_PATH at the interpreter's lib folder (Triton's Python backend links libpython), repo on path."""
    base = subprocess.run([str(python), "-c", "import sys; print(sys.base_prefix)"], capture_output=True,
                          text=True, timeout=60).stdout.strip()
    lib = str(Path(base) / "lib") if base else ""
    old = os.environ.get("LD_LIBRARY_PATH", "")
    return {**os.environ, "LD_LIBRARY_PATH": ":".join(p for p in (lib, old) if p), "PYTHONPATH": str(REPO_ROOT)}


def bench_peer(bundle, payloads: Path, plan, log_dir: Path, progress: Callable[[str], None] = print) -> list[dict]:
    """Start PyTriton on the bundle, drive it with the serving plan's closed-loop shape, stop it."""
    from benchmarks.errors import PeerUnavailable, ServerStartError
    from benchmarks.procs import ServerProcess, free_port
    from benchmarks.serving import drive, _line

    python = ensure_peer_venv(progress=progress)
    grpc_port, http_port, metrics_port = free_port(), free_port(), free_port()
    cmd = [str(python), "-m", "benchmarks.pytriton_peer", "--bundle", str(bundle.path), "--name", "student",
           "--grpc-port", str(grpc_port), "--http-port", str(http_port), "--metrics-port", str(metrics_port),
           "--max-batch-size", str(plan.max_batch_size), "--max-queue-delay-ms", str(plan.max_queue_delay_ms)]
    proc = ServerProcess("pytriton", cmd, log_dir, env=peer_env(python))
    try:
        proc.wait_for_line("READY", 180)
    except ServerStartError as exc:
        raise PeerUnavailable(str(exc)) from exc
    labels = {"target": "pytriton", "model": "student", "bundle": bundle.path.name, "variant": bundle.spec.variant,
              "batching": "on", "max_batch_size": plan.max_batch_size}
    try:
        kplan = replace(plan, rates=(), rate_fractions=())
        load = kplan.load([f"127.0.0.1:{grpc_port}"], "student", api="kserve", server_groups=[proc.pid])
        rows = drive(load, payloads, kplan, labels)
    finally:
        proc.stop()
    for row in rows:
        progress(_line(row))
    return rows


# ------------------------------------------------------------------------------------------------------------
# Server side (peer venv)
# ------------------------------------------------------------------------------------------------------------


def make_infer_fn(bundle_dir: str, threads: int = 0):
    """A batched PyTriton function: BYTES image/text (B, 1) -> FP32 logits (B, C), same code path as ours."""
    import numpy as np
    import onnxruntime as ort
    from pytriton.decorators import batch

    from export.bundle import TextEncoder, load_bundle, preprocess_images

    bundle = load_bundle(bundle_dir)
    spec = bundle.spec.preprocess
    encoder = TextEncoder(bundle.tokenizer_path, spec)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    session = ort.InferenceSession(str(bundle.model_path), sess_options=opts, providers=["CPUExecutionProvider"])

    @batch
    def infer(image, text):
        images = [bytes(x) for x in image.reshape(-1)]
        texts = [bytes(x).decode("utf-8") for x in text.reshape(-1)]
        ids, mask = encoder.encode(texts)
        feeds = {"pixel_values": preprocess_images(images, spec), "input_ids": ids, "attention_mask": mask}
        return {"logits": session.run(["logits"], feeds)[0].astype(np.float32)}

    return infer, bundle.spec.num_labels


def serve(args: argparse.Namespace) -> None:
    import numpy as np
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig

    infer, num_labels = make_infer_fn(args.bundle)
    config = TritonConfig(grpc_port=args.grpc_port, http_port=args.http_port, metrics_port=args.metrics_port)
    batcher = DynamicBatcher(max_queue_delay_microseconds=int(args.max_queue_delay_ms * 1000))
    with Triton(config=config) as triton:
        triton.bind(model_name=args.name, infer_func=infer,
                    inputs=[Tensor(name="image", dtype=bytes, shape=(1,)), Tensor(name="text", dtype=bytes, shape=(1,))],
                    outputs=[Tensor(name="logits", dtype=np.float32, shape=(num_labels,))],
                    config=ModelConfig(max_batch_size=args.max_batch_size, batcher=batcher), strict=False)
        triton.run()  # returns once Triton and the bound model are up
        print("READY", flush=True)
        stop = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        stop.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.pytriton_peer", description=__doc__.split("\n")[0])
    parser.add_argument("--bundle", required=True)
    parser.add_argument("--name", default="student")
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--metrics-port", type=int, default=8002)
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--max-queue-delay-ms", type=float, default=2.0)
    serve(parser.parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
