"""CPU seconds of process groups, read from /proc: how the serving benchmark shows where a request's time goes.

Latency says how long a request took; CPU seconds per request say what it cost, and on which side (the server or
the load generator). Where the server, the load generator and ONNX Runtime share a few cores, those costs bound the
requests per second any server design can reach there: cores / (CPU seconds per request). A server is measured
as its whole process group (`ServerProcess` starts each in a new session), so worker processes it starts, such as
PyTriton's Triton core, count with it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_PROC = Path("/proc")


def _stat_fields(pid: int | str) -> list[bytes] | None:
    """The fields of /proc/PID/stat after the command name (which may hold spaces and parentheses)."""
    try:
        raw = (_PROC / str(pid) / "stat").read_bytes()
    except OSError:  # gone, or no /proc on this system
        return None
    return raw[raw.rindex(b")") + 2:].split()


def group_cpu_s(pgid: int) -> float | None:
    """User + system CPU seconds so far of every live process in process group ``pgid``, all threads included;
    None where /proc is unavailable or the group has no process left."""
    total, found = 0.0, False
    for entry in _PROC.iterdir() if _PROC.is_dir() else ():
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(entry.name)
        if fields is None or int(fields[2]) != pgid:  # field 5 of stat: the process group
            continue
        total += (int(fields[11]) + int(fields[12])) / _TICKS  # fields 14 and 15: utime, stime
        found = True
    return total if found else None


@dataclass(frozen=True)
class CpuSample:
    """One reading: wall time, this process's CPU seconds and the servers' (None when unreadable)."""

    wall_s: float
    client_s: float
    server_s: float | None

    @classmethod
    def now(cls, server_groups: Iterable[int]) -> "CpuSample":
        readings = [group_cpu_s(g) for g in server_groups]
        unreadable = not readings or any(r is None for r in readings)
        return cls(time.perf_counter(), time.process_time(), None if unreadable else sum(readings))


def cpu_per_request(start: CpuSample, end: CpuSample, requests: int) -> dict[str, float]:
    """CPU milliseconds per answered request and cores busy on each side, between two readings."""
    wall = end.wall_s - start.wall_s
    if wall <= 0 or requests <= 0:
        return {}
    out = {"client_cpu_ms": (end.client_s - start.client_s) * 1000.0 / requests,
           "client_cores": (end.client_s - start.client_s) / wall}
    if start.server_s is not None and end.server_s is not None:
        out["server_cpu_ms"] = (end.server_s - start.server_s) * 1000.0 / requests
        out["server_cores"] = (end.server_s - start.server_s) / wall
    return out
