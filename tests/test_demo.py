"""`make demo` helpers: parallel stages show each result line, and a failing stage shows everything it said."""
import subprocess
import sys

import pytest

from benchmarks.demo import run_quiet, timed


def test_run_quiet_prints_the_result_line_only(capsys: pytest.CaptureFixture) -> None:
    out = run_quiet([sys.executable, "-c", "print('progress'); print('{\"parity\": true}')"])
    printed = capsys.readouterr().out
    assert '{"parity": true}' in printed and "progress" not in printed.split("\n", 1)[1]
    assert "progress" in out


def test_run_quiet_failure_shows_the_whole_output(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(subprocess.CalledProcessError):
        run_quiet([sys.executable, "-c", "import sys; print('stage detail'); sys.exit('export failed: parity')"])
    printed = capsys.readouterr().out
    assert "stage detail" in printed and "export failed: parity" in printed


def test_timed_records_the_stage_even_when_it_fails(capsys: pytest.CaptureFixture) -> None:
    times: dict[str, float] = {}
    assert timed(times, "ok", lambda x: x + 1, 1) == 2
    with pytest.raises(ValueError):
        timed(times, "bad", lambda: (_ for _ in ()).throw(ValueError("no")))
    assert set(times) == {"ok", "bad"} and all(v >= 0 for v in times.values())
    assert "[bad:" in capsys.readouterr().out
