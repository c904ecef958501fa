"""`mmkd-predict`: call a running mmkd server and print JSON.

One request:   mmkd-predict --server 127.0.0.1:50051 --model student --image cat.png --text "what color?"
Many at once:  mmkd-predict --server HOST:PORT[,HOST:PORT...] --model student --requests reqs.jsonl
               (each line {"image": "path.png", "text": "...", "id": "optional"}; answers are JSON lines in the
               same order). Several addresses are balanced with gRPC's own round_robin policy.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc

from server._proto.mmkd.v1 import inference_pb2 as pb
from server._proto.mmkd.v1 import inference_pb2_grpc as pb_grpc

ROUND_ROBIN = json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})


def channel_target(servers: str) -> str:
    """'h1:p1,h2:p2' -> a gRPC target; several addresses become one ipv4:/ipv6: list for round_robin."""
    addresses = [a.strip() for a in servers.split(",") if a.strip()]
    if not addresses:
        raise ValueError("--server needs at least one HOST:PORT")
    if len(addresses) == 1:
        return addresses[0]
    resolved = [_resolve(a) for a in addresses]
    families = {family for family, _ in resolved}
    if len(families) != 1:
        raise ValueError(f"mix of IPv4 and IPv6 addresses in {addresses}; use one family")
    return f"{families.pop()}:" + ",".join(addr for _, addr in resolved)


def _resolve(address: str) -> tuple[str, str]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"server address {address!r} is not HOST:PORT")
    host = host.strip("[]")
    info = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)[0]
    ip = info[4][0]
    return ("ipv6", f"[{ip}]:{port}") if info[0] == socket.AF_INET6 else ("ipv4", f"{ip}:{port}")


def channel_options() -> list[tuple[str, Any]]:
    return [("grpc.service_config", ROUND_ROBIN), ("grpc.lb_policy_name", "round_robin"),
            ("grpc.max_receive_message_length", 64 * 1024 * 1024),
            ("grpc.max_send_message_length", 64 * 1024 * 1024)]


def open_channel(servers: str, *, tls_ca: Path | None = None) -> grpc.aio.Channel:
    target = channel_target(servers)
    if tls_ca is None:
        return grpc.aio.insecure_channel(target, options=channel_options())
    creds = grpc.ssl_channel_credentials(root_certificates=tls_ca.read_bytes())
    return grpc.aio.secure_channel(target, creds, options=channel_options())


def response_to_dict(response: pb.ClassifyResponse) -> dict[str, Any]:
    return {"id": response.request_id, "model": response.model, "version": response.model_version,
            "label": response.label,
            "top": [{"label": s.label, "probability": round(s.probability, 6)} for s in response.top],
            "timings_ms": {"preprocess": round(response.timings.preprocess_ms, 3),
                           "queue": round(response.timings.queue_ms, 3),
                           "compute": round(response.timings.compute_ms, 3),
                           "total": round(response.timings.total_ms, 3),
                           "batch_size": response.timings.batch_size}}


async def classify_many(servers: str, model: str, requests: Sequence[dict[str, Any]], *, top_k: int = 5,
                        concurrency: int = 64, timeout: float = 30.0, token: str | None = None,
                        tls_ca: Path | None = None) -> list[dict[str, Any]]:
    """Send every request (at most `concurrency` at once) and return one JSON-able dict each, in order.

    A failed request gives {"id", "error": {"code", "message"}} instead of failing the others.
    """
    metadata = (("authorization", f"Bearer {token}"),) if token else None
    limit = asyncio.Semaphore(concurrency)
    async with open_channel(servers, tls_ca=tls_ca) as channel:
        stub = pb_grpc.InferenceStub(channel)

        async def one(i: int, req: dict[str, Any]) -> dict[str, Any]:
            rid = str(req.get("id", i))
            async with limit:
                try:
                    message = pb.ClassifyRequest(model=model, image=req["image_bytes"], text=req["text"],
                                                 top_k=top_k, request_id=rid)
                    return response_to_dict(await stub.Classify(message, timeout=timeout, metadata=metadata))
                except grpc.aio.AioRpcError as exc:
                    return {"id": rid, "error": {"code": exc.code().name, "message": exc.details()}}

        return list(await asyncio.gather(*(one(i, r) for i, r in enumerate(requests))))


def read_requests(path: Path) -> list[dict[str, Any]]:
    """JSON lines {"image": path (relative to the file), "text": ..., "id": optional}."""
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            image = Path(item["image"])
            image = image if image.is_absolute() else path.parent / image
            out.append({"id": item.get("id", str(n)), "text": item["text"], "image_bytes": image.read_bytes()})
        except (json.JSONDecodeError, KeyError, TypeError, OSError) as exc:
            raise SystemExit(f"mmkd-predict: {path}:{n}: {exc}; expected {{\"image\": path, \"text\": ...}}")
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmkd-predict", description=__doc__.splitlines()[0])
    p.add_argument("--server", default="127.0.0.1:50051", help="HOST:PORT[,HOST:PORT...] (round_robin)")
    p.add_argument("--model", required=True)
    p.add_argument("--image", type=Path, help="image file (PNG, JPEG, WebP)")
    p.add_argument("--text", help="the question about the image")
    p.add_argument("--requests", type=Path, help="JSON lines file of many requests, sent concurrently")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--timeout", type=float, default=30.0, help="deadline per request in seconds")
    p.add_argument("--token-file", type=Path, help="bearer token file (first line)")
    p.add_argument("--tls-ca", type=Path, help="CA certificate to verify a TLS server")
    return p


def read_token(path: Path) -> str:
    lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"token file {path} is empty; put the bearer token on its first line")
    return lines[0]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.requests and not (args.image and args.text is not None):
        print("mmkd-predict: give --image and --text, or --requests FILE.jsonl", file=sys.stderr)
        return 2
    try:  # the caller's own files and addresses (the CA file and server list are read as the channel opens)
        if args.requests:
            requests = read_requests(args.requests)
        else:
            requests = [{"id": "0", "text": args.text, "image_bytes": args.image.read_bytes()}]
        token = read_token(args.token_file) if args.token_file else None
        results = asyncio.run(classify_many(args.server, args.model, requests, top_k=args.top_k,
                                            concurrency=args.concurrency, timeout=args.timeout, token=token,
                                            tls_ca=args.tls_ca))
    except (OSError, ValueError) as exc:  # a message, not a traceback; failed RPCs are answers, not raised
        print(f"mmkd-predict: {exc}", file=sys.stderr)
        return 2
    if args.requests:
        for result in results:
            print(json.dumps(result))
    else:
        print(json.dumps(results[0], indent=2))
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
