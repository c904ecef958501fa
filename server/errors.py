"""Every error the server raises on purpose, as one tree; `status.py` maps them to gRPC status codes.

    ServerError
    ├── ConfigError            settings or command-line values that cannot work (exit code 2)
    ├── ModelLoadError         a bundle cannot be loaded, or the requested device is not usable
    ├── ModelNotFoundError     a request names a model this server does not serve      -> NOT_FOUND
    ├── RequestError           a request is malformed beyond image/text content         -> INVALID_ARGUMENT
    ├── QueueFullError         the model's queue is full                                -> RESOURCE_EXHAUSTED
    ├── DeadlineExpiredError   the request's deadline passed while it was queued       -> DEADLINE_EXCEEDED
    ├── ShuttingDownError      the server is draining                                   -> UNAVAILABLE
    ├── NotReadyError          models are still loading and warming up                  -> UNAVAILABLE
    └── BatchError             a batch run broke its contract (wrong number of results) -> INTERNAL

Bad image or text content raises `export.bundle.InputError` (and subclasses), which also maps to
INVALID_ARGUMENT: the same error types serve training-time evaluation, export and serving.
"""

from __future__ import annotations


class ServerError(Exception):
    """Base of the server's own errors."""


class ConfigError(ServerError, ValueError):
    """A setting has an unusable value; the message names the setting and what would work."""


class ModelLoadError(ServerError):
    """A model bundle cannot be served (bad bundle, ORT failure, requested device unavailable)."""


class ModelNotFoundError(ServerError, LookupError):
    """The request names a model that is not served."""

    def __init__(self, name: str, known: list[str]) -> None:
        super().__init__(f"model {name!r} is not served here; served models: {sorted(known)}")
        self.name = name


class RequestError(ServerError, ValueError):
    """The request is malformed; `field` names the part at fault (e.g. KServe tensor names and shapes)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class QueueFullError(ServerError):
    """The model's batching queue is full; the client should back off and retry."""


class DeadlineExpiredError(ServerError):
    """The request's deadline passed while it waited in the queue; it was never computed."""


class ShuttingDownError(ServerError):
    """The server is draining and accepts no new requests."""


class NotReadyError(ServerError):
    """Models are still loading or warming up; retry shortly (health turns SERVING when ready)."""


class BatchError(ServerError):
    """A batch run returned a result count different from its request count."""
