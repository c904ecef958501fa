"""Server settings: one frozen validated dataclass; environment under flags; every problem named."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from server.cli import build_parser
from server.errors import ConfigError
from server.settings import ServerSettings


def test_defaults_and_frozen():
    s = ServerSettings(model_repository=Path("m"))
    assert (s.host, s.port, s.device, s.max_batch_size, s.metrics_port) == ("127.0.0.1", 50051, "auto", 16, None)
    assert s.limits.max_text_chars == 1024 and s.instance_kind == "auto"
    # ORT leaves the event loop a core and does not spin on it (measured in server/README.md)
    assert s.intra_op_spinning is False and s.ort_threads == max(1, (os.cpu_count() or 2) - 1)
    assert ServerSettings(model_repository=Path("m"), intra_op_threads=3).ort_threads == 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.port = 1  # type: ignore[misc]


def test_all_value_problems_are_reported_at_once():
    with pytest.raises(ConfigError) as err:
        ServerSettings(model_repository="m", port=70000, max_batch_size=0, device="gpu", tls_cert="c.pem",
                       inline_compute_ms=-1, preprocess_in="gpu", instance_kind="fork")
    message = str(err.value)
    for needle in ("port", "max_batch_size", "device", "tls_cert and tls_key", "inline_compute_ms", "preprocess_in",
                   "instance_kind must be 'auto', 'thread' or 'process'"):
        assert needle in message


def test_wrong_types_fail_loudly():
    with pytest.raises(ConfigError, match="max_batch_size must be an int"):
        ServerSettings(model_repository="m", max_batch_size="8")


def test_environment_fills_in_and_flags_win():
    env = {"MMKD_MODEL_REPOSITORY": "/models", "MMKD_MAX_BATCH_SIZE": "8", "MMKD_MODELS": "a, b",
           "MMKD_MAX_QUEUE_DELAY_MS": "2.5", "MMKD_AUTH_HEALTH": "true", "MMKD_INTRA_OP_SPINNING": "true",
           "MMKD_UNRELATED": "x", "PATH": "/bin"}
    args = vars(build_parser().parse_args(["--max-batch-size", "32", "--port", "0", "--instance-kind", "thread"]))
    s = ServerSettings.from_sources(args, env)
    assert s.model_repository == Path("/models") and s.models == ("a", "b")
    assert s.max_batch_size == 32 and s.port == 0 and s.max_queue_delay_ms == 2.5 and s.auth_health is True
    assert s.intra_op_spinning is True and s.instance_kind == "thread"


def test_bad_environment_value_names_the_variable():
    with pytest.raises(ConfigError, match="MMKD_PORT"):
        ServerSettings.from_sources({}, {"MMKD_MODEL_REPOSITORY": "m", "MMKD_PORT": "fifty"})


def test_repository_is_required():
    with pytest.raises(ConfigError, match="--model-repository"):
        ServerSettings.from_sources({}, {})


def test_every_flag_maps_to_a_setting():
    fields = {f.name for f in dataclasses.fields(ServerSettings)}
    dests = {a.dest for a in build_parser()._actions if a.dest != "help"}
    assert dests <= fields


def test_max_concurrent_rpcs_is_derived_from_the_queues_unless_given():
    s = ServerSettings(model_repository="m", max_queue_size=100, max_batch_size=10, instances=2)
    assert s.max_concurrent_rpcs == 0  # derived: every model's queue and running batches, plus headroom
    assert s.rpc_limit(1) == 100 + 2 * 10 + 64 and s.rpc_limit(3) == 3 * (100 + 2 * 10) + 64
    assert ServerSettings(model_repository="m", max_concurrent_rpcs=7).rpc_limit(3) == 7
    args = vars(build_parser().parse_args(["--max-concurrent-rpcs", "500"]))
    assert ServerSettings.from_sources(args, {"MMKD_MODEL_REPOSITORY": "m"}).max_concurrent_rpcs == 500
    env = {"MMKD_MODEL_REPOSITORY": "m", "MMKD_MAX_CONCURRENT_RPCS": "300"}
    assert ServerSettings.from_sources({}, env).max_concurrent_rpcs == 300
    with pytest.raises(ConfigError, match="max_concurrent_rpcs must be >= 1, or 0"):
        ServerSettings(model_repository="m", max_concurrent_rpcs=-1)
    with pytest.raises(ConfigError, match="max_concurrent_rpcs must be an int"):
        ServerSettings(model_repository="m", max_concurrent_rpcs=1.5)
