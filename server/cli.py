"""`mmkd-serve`: serve a model repository over gRPC until SIGTERM/SIGINT, then drain and exit 0.

Every flag can also come from an MMKD_* environment variable (MMKD_MAX_BATCH_SIZE=8); flags win.
Exit codes: 0 after a graceful shutdown, 2 for unusable settings, 1 when a model cannot be served.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from server.app import InferenceServer
from server.errors import ConfigError, ServerError
from server.logs import fields, setup_logging
from server.settings import ServerSettings
from server.workers import supervise

log = logging.getLogger("mmkd.server.cli")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmkd-serve", description=__doc__.splitlines()[0])
    p.add_argument("--model-repository", dest="model_repository",
                   help="folder of model bundles (folder name = model name)")
    p.add_argument("--model", dest="models", action="append", help="serve only this model (repeatable)")
    p.add_argument("--host", help="address to bind (default 127.0.0.1; 0.0.0.0 for all interfaces)")
    p.add_argument("--port", type=int, help="gRPC port (default 50051; 0 picks a free one)")
    p.add_argument("--workers", type=int,
                   help="server processes sharing the port (SO_REUSEPORT; the kernel spreads connections over "
                        "them): one Python process keeps only ~1.2 cores busy (default 1)")
    p.add_argument("--reuse-port", action="store_const", const=True, default=None,
                   help="bind with SO_REUSEPORT so that other processes may serve the same port (set for each of "
                        "--workers; default off, so that a port in use is an error)")
    p.add_argument("--max-batch-size", type=int, help="largest batch formed (default 16)")
    p.add_argument("--max-queue-delay-ms", type=float,
                   help="wait at most this long after the oldest queued request for a batch to fill (default 5)")
    p.add_argument("--eager-dispatch", action=argparse.BooleanOptionalAction, default=None,
                   help="run a request at once when no batch of its model is computing, instead of waiting the "
                        "queue delay (default on; --no-eager-dispatch waits like Triton)")
    p.add_argument("--max-queue-size", type=int, help="queued requests per model before RESOURCE_EXHAUSTED (256)")
    p.add_argument("--max-concurrent-rpcs", type=int,
                   help="RPCs in the server at once (streams count once) before gRPC itself refuses new ones with "
                        "RESOURCE_EXHAUSTED (default 0: every model's queue and batches plus 64)")
    p.add_argument("--instances", type=int, help="batches of one model that may run at once (default 1)")
    p.add_argument("--instance-kind", choices=("auto", "thread", "process"),
                   help="where each model instance prepares and computes its batches: a 'thread' of the server or "
                        "a 'process' of its own, so that this work stops sharing the server's interpreter lock "
                        "with the event loop (more requests/s under load; a pipe round trip per batch of two or "
                        "more; a second copy of the model in memory). 'auto' (default) picks process for models "
                        "whose requests are prepared with their batch (see --preprocess-in)")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N (default auto: CUDA when it really loads)")
    p.add_argument("--metrics-port", type=int, help="serve Prometheus /metrics on this port (default: off)")
    p.add_argument("--tls-cert", help="PEM certificate chain; with --tls-key enables TLS")
    p.add_argument("--tls-key", help="PEM private key")
    p.add_argument("--auth-token-file", help="file of accepted bearer tokens, one per line")
    p.add_argument("--auth-health", action="store_const", const=True, default=None,
                   help="also require the token for health checks (default: health stays open for probes)")
    p.add_argument("--preprocess-threads", type=int, help="threads decoding images and texts (default 2)")
    p.add_argument("--inline-preprocess-bytes", type=int,
                   help="images up to this many bytes are prepared inline (see --preprocess-in) instead of in the "
                        "thread pool, where a hand-off per request costs more than the decode (default 65536; "
                        "0: always the pool)")
    p.add_argument("--preprocess-in", choices=("auto", "loop", "batch"),
                   help="where inline requests are prepared: 'batch' by the compute thread as part of their batch, "
                        "'loop' on the event loop; 'auto' (default) picks batch for models whose per-sample "
                        "compute at full batch costs less than preparing a request, measured at warm-up")
    p.add_argument("--inline-compute-ms", type=float,
                   help="a request that finds its model idle runs on the event loop, without the two thread "
                        "hand-offs, when the model's batch of 1 took at most this long at warm-up and eager dispatch "
                        "is on: lower latency for lone requests, slightly lower throughput under load (default 0: off)")
    p.add_argument("--intra-op-threads", type=int,
                   help="ONNX Runtime threads per run (default 0: every core but one, left to the event loop)")
    p.add_argument("--intra-op-spinning", action=argparse.BooleanOptionalAction, default=None,
                   help="let ORT's intra-op workers busy-wait between runs: lower latency for lone requests, "
                        "but the spinning takes cores the event loop needs (default off)")
    p.add_argument("--grace-s", type=float, help="seconds shutdown waits for in-flight requests (default 10)")
    p.add_argument("--max-message-bytes", type=int, help="largest gRPC message accepted (default 16 MiB)")
    p.add_argument("--max-image-bytes", type=int, help="largest encoded image (default 8 MiB)")
    p.add_argument("--max-image-pixels", type=int, help="largest image in pixels (default 4096*4096)")
    p.add_argument("--max-text-chars", type=int, help="longest text in characters (default 1024)")
    p.add_argument("--log-format", choices=("json", "text"), help="log lines as JSON (default) or text")
    return p


async def serve(settings: ServerSettings) -> int:
    """Start, wait for SIGTERM/SIGINT, drain; returns the process exit code."""
    server = InferenceServer(settings)
    loop = asyncio.get_running_loop()
    stop_requested = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop_requested.set)
    try:
        await server.start()
        await stop_requested.wait()
        log.info("signal_received")
    finally:
        await server.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = vars(build_parser().parse_args(argv))
    if args.get("models"):
        args["models"] = tuple(args["models"])
    try:
        settings = ServerSettings.from_sources(args)
    except ConfigError as exc:
        print(f"mmkd-serve: {exc}", file=sys.stderr)
        return 2
    return run(settings)


def run(settings: ServerSettings) -> int:
    """The server (one process, or the supervisor of `--workers`; each worker runs this with workers=1) until a
    signal; returns the exit code."""
    setup_logging(settings.log_format)
    try:
        return supervise(settings) if settings.workers > 1 else asyncio.run(serve(settings))
    except ConfigError as exc:
        log.error("config_error", extra=fields(error=str(exc)))
        return 2
    except ServerError as exc:
        log.error("startup_failed", extra=fields(error=str(exc)))
        return 1


if __name__ == "__main__":
    sys.exit(main())
