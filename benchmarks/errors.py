"""The benchmark harness's exceptions, one tree so the CLI can turn each into a clear message.

    BenchError
    ├── BenchSetupError     inputs missing or unusable (no bundles, bad data folder, unknown section)
    ├── ServerStartError    a server process (mmkd-serve, echo, PyTriton) did not become ready in time
    └── PeerUnavailable     the PyTriton peer could not be installed or started; the rest of the run goes on
"""

from __future__ import annotations


class BenchError(Exception):
    """A benchmark could not run."""


class BenchSetupError(BenchError):
    """The inputs of a benchmark are missing or unusable; the message says which and how to fix it."""


class ServerStartError(BenchError):
    """A server under test did not start or become ready; the message carries the tail of its log."""


class PeerUnavailable(BenchError):
    """The PyTriton peer cannot run here (install failed, import failed, no free port ...)."""
