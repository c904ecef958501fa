"""Bearer-token authentication as a gRPC server interceptor.

Clients send `authorization: Bearer <token>` metadata. Tokens are compared in constant time (hmac.compare_digest)
against every token in --auth-token-file (one per line, `#` comments allowed), so tokens can be rotated by
listing old and new side by side. Health checks stay open unless `auth_health` is set, because Kubernetes probes
cannot send a token.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc

from server.errors import ConfigError

HEALTH_PREFIX = "/grpc.health.v1.Health/"


def read_tokens(path: Path) -> tuple[bytes, ...]:
    """Read the token file; refuse an empty one (it would lock every client out)."""
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise ConfigError(f"auth_token_file {path}: cannot read it ({exc.strerror})") from exc
    tokens = tuple(line.strip().encode() for line in lines if line.strip() and not line.lstrip().startswith("#"))
    if not tokens:
        raise ConfigError(f"auth_token_file {path} holds no token (one token per line)")
    return tokens


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Rejects calls without a valid bearer token with UNAUTHENTICATED before any handler runs."""

    def __init__(self, tokens: tuple[bytes, ...], *, protect_health: bool = False) -> None:
        self._tokens = tokens
        self._protect_health = protect_health

        async def deny(request, context: grpc.aio.ServicerContext):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                "missing or invalid bearer token: send metadata 'authorization: Bearer <token>'")

        self._deny_unary = grpc.unary_unary_rpc_method_handler(deny)
        self._deny_stream = grpc.stream_stream_rpc_method_handler(self._deny_stream_fn)

    @staticmethod
    async def _deny_stream_fn(request_iterator, context: grpc.aio.ServicerContext):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                            "missing or invalid bearer token: send metadata 'authorization: Bearer <token>'")
        yield  # pragma: no cover - makes this an async generator

    def _allowed(self, metadata: tuple) -> bool:
        values = [v for k, v in metadata or () if k == "authorization"]
        if len(values) != 1:
            return False
        value = values[0].encode() if isinstance(values[0], str) else values[0]
        if not value.startswith(b"Bearer "):
            return False
        presented = value[len(b"Bearer "):].strip()
        ok = False
        for token in self._tokens:  # check all, no early exit: timing says nothing about which token
            ok |= hmac.compare_digest(presented, token)
        return ok

    async def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable],
                                handler_call_details: grpc.HandlerCallDetails):
        method = handler_call_details.method or ""
        if (method.startswith(HEALTH_PREFIX) and not self._protect_health) or self._allowed(
                handler_call_details.invocation_metadata):
            return await continuation(handler_call_details)
        handler = await continuation(handler_call_details)
        if handler is not None and (handler.request_streaming or handler.response_streaming):
            return self._deny_stream
        return self._deny_unary
