"""Exceptions -> gRPC status codes, in one table (DESIGN.md's wire contract)."""

from __future__ import annotations

import logging

import grpc

from export.bundle import InputError

from server.errors import (BatchError, DeadlineExpiredError, ModelNotFoundError, NotReadyError, QueueFullError,
                           RequestError, ShuttingDownError)

log = logging.getLogger("mmkd.server.status")

_CODES: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (InputError, grpc.StatusCode.INVALID_ARGUMENT),
    (RequestError, grpc.StatusCode.INVALID_ARGUMENT),
    (ModelNotFoundError, grpc.StatusCode.NOT_FOUND),
    (QueueFullError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (DeadlineExpiredError, grpc.StatusCode.DEADLINE_EXCEEDED),
    (ShuttingDownError, grpc.StatusCode.UNAVAILABLE),
    (NotReadyError, grpc.StatusCode.UNAVAILABLE),
    (BatchError, grpc.StatusCode.INTERNAL),
)


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and client-facing message for an exception; unexpected ones are logged, not leaked."""
    for kind, code in _CODES:
        if isinstance(exc, kind):
            return code, str(exc)
    log.error("unexpected error while handling a request", exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal server error ({type(exc).__name__}); see the server log"
