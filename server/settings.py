"""Server settings: one frozen, validated dataclass, filled from defaults < MMKD_* environment < command line.

>>> ServerSettings(model_repository=Path("models"), max_batch_size=8).max_queue_delay_ms
5.0
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from export.bundle import InputLimits

from server.errors import ConfigError

_DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
ENV_PREFIX = "MMKD_"
RPC_HEADROOM = 64  # RPC slots beyond the models' queues: health checks and watches, metadata calls, streams


@dataclass(frozen=True, kw_only=True)
class ServerSettings:
    """Everything `mmkd-serve` needs. Unknown keys and wrong types fail; every problem is listed at once.

    Batching trade-off: a larger `max_queue_delay_ms` forms bigger batches (throughput) at the cost of up to that
    much added latency per request when traffic is light; `max_batch_size` caps a batch's memory and latency.
    """

    model_repository: Path
    models: tuple[str, ...] = ()  # empty: every bundle folder in the repository
    host: str = "127.0.0.1"
    port: int = 50051  # 0 picks a free port (tests)
    workers: int = 1  # server processes sharing the port (server/workers.py)
    reuse_port: bool = False  # SO_REUSEPORT: set for workers; off otherwise, so that a port in use is an error
    max_batch_size: int = 16
    max_queue_delay_ms: float = 5.0
    eager_dispatch: bool = True  # a request that finds the model idle runs at once instead of waiting the delay
    max_queue_size: int = 256  # queued requests per model before RESOURCE_EXHAUSTED
    instances: int = 1  # batches of one model that may run at once
    instance_kind: str = "auto"  # where a model instance runs: auto | thread (of the server) | process (its own)
    max_concurrent_rpcs: int = 0  # RPCs in the server at once before gRPC refuses (RESOURCE_EXHAUSTED); 0: derived
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    metrics_port: int | None = None  # None: no metrics endpoint; 0 picks a free port
    tls_cert: Path | None = None
    tls_key: Path | None = None
    auth_token_file: Path | None = None
    auth_health: bool = False  # also require the token for grpc.health.v1 (probes usually can't send one)
    preprocess_threads: int = 2
    inline_preprocess_bytes: int = 64 * 1024  # images up to this size are prepared inline, larger in the pool
    preprocess_in: str = "auto"  # where inline requests are prepared: auto | loop (event loop) | batch (compute)
    inline_compute_ms: float = 0.0  # a lone request runs on the event loop if the model's batch of 1 is this fast
    intra_op_threads: int = 0  # ORT threads per run; 0: every core but one, which the event loop needs (>= 1)
    intra_op_spinning: bool = False  # ORT's workers busy-wait between runs (ORT's own default is on)
    grace_s: float = 10.0  # how long shutdown waits for in-flight requests
    max_message_bytes: int = 16 * 1024 * 1024
    max_image_bytes: int = InputLimits.max_image_bytes
    max_image_pixels: int = InputLimits.max_image_pixels
    max_text_chars: int = InputLimits.max_text_chars
    log_format: str = "json"  # json | text

    @property
    def ort_threads(self) -> int:
        """The intra-op thread count sessions get: as set, or every core but the event loop's."""
        return self.intra_op_threads or max(1, (os.cpu_count() or 2) - 1)

    def __post_init__(self) -> None:
        object.__setattr__(self, "model_repository", Path(self.model_repository))
        object.__setattr__(self, "models", tuple(self.models))
        for name in ("tls_cert", "tls_key", "auth_token_file"):
            value = getattr(self, name)
            object.__setattr__(self, name, None if value in (None, "") else Path(value))
        problems = _type_problems(self) or _value_problems(self)
        if problems:
            raise ConfigError("invalid server settings: " + "; ".join(problems))

    @property
    def limits(self) -> InputLimits:
        return InputLimits(max_image_bytes=self.max_image_bytes, max_image_pixels=self.max_image_pixels,
                           max_text_chars=self.max_text_chars)

    def rpc_limit(self, models: int) -> int:
        """The `maximum_concurrent_rpcs` handed to gRPC for `models` served models: the explicit setting, or every
        model's full queue and running batches plus RPC_HEADROOM (so gRPC refuses only what the models' own queues
        could never take, and the queue check keeps refusing per model)."""
        if self.max_concurrent_rpcs:
            return self.max_concurrent_rpcs
        return max(1, models) * (self.max_queue_size + self.instances * self.max_batch_size) + RPC_HEADROOM

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def to_dict(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v)
                for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_sources(cls, cli: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> "ServerSettings":
        """Merge MMKD_* environment variables under explicit values (None in `cli` means "not given")."""
        merged = env_overrides(os.environ if environ is None else environ)
        merged.update({k: v for k, v in cli.items() if v is not None and v != ()})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(merged) - known)
        if unknown:
            raise ConfigError(f"unknown settings {unknown}; known settings are {sorted(known)}")
        if "model_repository" not in merged:
            raise ConfigError("model_repository is required (--model-repository DIR or MMKD_MODEL_REPOSITORY)")
        return cls(**merged)


_INT_FIELDS = ("port", "workers", "max_batch_size", "max_queue_size", "instances", "preprocess_threads",
               "intra_op_threads", "inline_preprocess_bytes", "max_concurrent_rpcs",
               "max_message_bytes", "max_image_bytes", "max_image_pixels", "max_text_chars")
_FLOAT_FIELDS = ("max_queue_delay_ms", "grace_s", "inline_compute_ms")
_BOOL_FIELDS = ("auth_health", "eager_dispatch", "intra_op_spinning", "reuse_port")


def _type_problems(s: ServerSettings) -> list[str]:
    problems = []
    for name in _INT_FIELDS:
        value = getattr(s, name)
        if not isinstance(value, int) or isinstance(value, bool):
            problems.append(f"{name} must be an int, got {value!r}")
    for name in _FLOAT_FIELDS:
        value = getattr(s, name)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            problems.append(f"{name} must be a number, got {value!r}")
    if s.metrics_port is not None and (not isinstance(s.metrics_port, int) or isinstance(s.metrics_port, bool)):
        problems.append(f"metrics_port must be an int or unset, got {s.metrics_port!r}")
    for name in _BOOL_FIELDS:
        if not isinstance(getattr(s, name), bool):
            problems.append(f"{name} must be a bool, got {getattr(s, name)!r}")
    if not all(isinstance(m, str) and m for m in s.models):
        problems.append(f"models must be non-empty names, got {list(s.models)}")
    return problems


def _value_problems(s: ServerSettings) -> list[str]:
    problems = []
    if not 0 <= s.port <= 65535:
        problems.append(f"port must be in [0, 65535], got {s.port}")
    if s.metrics_port is not None and not 0 <= s.metrics_port <= 65535:
        problems.append(f"metrics_port must be in [0, 65535], got {s.metrics_port}")
    if not 1 <= s.max_batch_size <= 4096:
        problems.append(f"max_batch_size must be in [1, 4096], got {s.max_batch_size}")
    if not 0 <= s.max_queue_delay_ms <= 10_000:
        problems.append(f"max_queue_delay_ms must be in [0, 10000], got {s.max_queue_delay_ms}")
    if s.max_queue_size < 1:
        problems.append(f"max_queue_size must be >= 1, got {s.max_queue_size}")
    for name in ("workers", "instances", "preprocess_threads", "max_message_bytes", "max_image_bytes",
                 "max_image_pixels", "max_text_chars"):
        if getattr(s, name) < 1:
            problems.append(f"{name} must be >= 1, got {getattr(s, name)}")
    if s.inline_preprocess_bytes < 0:
        problems.append(f"inline_preprocess_bytes must be >= 0, got {s.inline_preprocess_bytes}")
    if not 0 <= s.inline_compute_ms <= 1000:
        problems.append(f"inline_compute_ms must be in [0, 1000], got {s.inline_compute_ms}")
    if s.max_concurrent_rpcs < 0:
        problems.append(f"max_concurrent_rpcs must be >= 1, or 0 to derive it from the queues, "
                        f"got {s.max_concurrent_rpcs}")
    if s.intra_op_threads < 0:
        problems.append(f"intra_op_threads must be >= 0, got {s.intra_op_threads}")
    if s.grace_s < 0:
        problems.append(f"grace_s must be >= 0, got {s.grace_s}")
    if not isinstance(s.device, str) or not _DEVICE_RE.match(s.device):
        problems.append(f"device must be auto, cpu, cuda or cuda:N, got {s.device!r}")
    if (s.tls_cert is None) != (s.tls_key is None):
        problems.append("tls_cert and tls_key go together: give both or neither")
    if s.instance_kind not in ("auto", "thread", "process"):
        problems.append(f"instance_kind must be 'auto', 'thread' or 'process', got {s.instance_kind!r}")
    if s.preprocess_in not in ("auto", "loop", "batch"):
        problems.append(f"preprocess_in must be 'auto', 'loop' or 'batch', got {s.preprocess_in!r}")
    if s.log_format not in ("json", "text"):
        problems.append(f"log_format must be 'json' or 'text', got {s.log_format!r}")
    if not s.host:
        problems.append("host must not be empty")
    return problems


def env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    """MMKD_MAX_BATCH_SIZE=8 -> {"max_batch_size": 8}; MMKD_MODELS=a,b -> ("a", "b"). Bad values fail loudly."""
    out: dict[str, Any] = {}
    fields = {f.name: f for f in dataclasses.fields(ServerSettings)}
    for key, raw in environ.items():
        if not key.startswith(ENV_PREFIX):
            continue
        name = key[len(ENV_PREFIX):].lower()
        if name not in fields:
            continue  # MMKD_* is shared with other mmkd commands; only our names are read
        out[name] = _parse_env(name, key, raw)
    return out


def _parse_env(name: str, key: str, raw: str) -> Any:
    try:
        if name in _INT_FIELDS or name == "metrics_port":
            return int(raw)
        if name in _FLOAT_FIELDS:
            return float(raw)
    except ValueError as exc:
        raise ConfigError(f"environment variable {key}={raw!r} is not a number") from exc
    if name in _BOOL_FIELDS:
        if raw.lower() not in ("1", "0", "true", "false", "yes", "no"):
            raise ConfigError(f"environment variable {key}={raw!r}: use true or false")
        return raw.lower() in ("1", "true", "yes")
    if name == "models":
        return tuple(m.strip() for m in raw.split(",") if m.strip())
    return raw
