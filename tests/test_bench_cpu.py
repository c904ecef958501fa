"""CPU accounting of server process groups: the numbers behind the report's "where a request's time goes"."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from benchmarks.cpu import CpuSample, cpu_per_request, group_cpu_s

BURN = "import time\nt = time.process_time()\nwhile time.process_time() - t < {secs}: pass\nprint('done', flush=True)\n" \
       "time.sleep(30)"


def test_group_cpu_counts_every_process_of_the_group():
    # a leader that burns 0.3 s and a child in its group that burns 0.3 s: the group used about 0.6 s
    code = (f"import subprocess, sys\nchild = subprocess.Popen([sys.executable, '-c', {BURN.format(secs=0.3)!r}])\n"
            + BURN.format(secs=0.3))
    leader = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert leader.stdout.readline().strip() == "done"
        deadline = time.monotonic() + 20
        used = 0.0
        while time.monotonic() < deadline and used < 0.55:
            used = group_cpu_s(leader.pid) or 0.0
            time.sleep(0.05)
        assert 0.55 <= used < 5.0
    finally:
        os.killpg(leader.pid, signal.SIGKILL)
        leader.wait()


def test_group_cpu_of_a_gone_group_is_none():
    proc = subprocess.Popen([sys.executable, "-c", "pass"], start_new_session=True)
    proc.wait()
    assert group_cpu_s(proc.pid) is None
    assert CpuSample.now([proc.pid]).server_s is None


def test_cpu_per_request_divides_by_answers_and_wall_time():
    start, end = CpuSample(10.0, 1.0, 5.0), CpuSample(12.0, 2.0, 8.0)  # 2 s wall, client 1 s, server 3 s
    got = cpu_per_request(start, end, requests=1000)
    assert got == {"client_cpu_ms": 1.0, "client_cores": 0.5, "server_cpu_ms": 3.0, "server_cores": 1.5}
    assert "server_cpu_ms" not in cpu_per_request(CpuSample(0, 0, None), CpuSample(1, 1, None), 10)
    assert cpu_per_request(start, end, requests=0) == {}
