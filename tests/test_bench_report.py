"""The report renders tables, acceptance verdicts and PNG plots from a results dict; verdicts follow the numbers."""

from __future__ import annotations

import copy
import json

from benchmarks.report import (acceptance, batching_gain, cpu_bound, lone_request, render_markdown, time_budget,
                               write_report)


def _lat(model, runtime, batch, p50, variant="fp32"):
    return {"model": model, "runtime": runtime, "variant": variant, "provider": "CPUExecutionProvider",
            "batch": batch, "calls": 10, "p50_ms": p50, "p90_ms": p50 * 1.1, "p95_ms": p50 * 1.2,
            "p99_ms": p50 * 1.5, "throughput": batch * 1000 / p50}


def _srv(target, model, conc, rps, p50, batching="on", api="mmkd", p99=None):
    return {"target": target, "model": model, "variant": "fp32", "batching": batching, "api": api,
            "shape": "closed", "concurrency": conc, "throughput": rps, "p50_ms": p50, "p95_ms": p50 * 2,
            "p99_ms": p99 or p50 * 3, "errors": {}, "error_count": 0, "max_batch_size": 32 if batching == "on" else 1}


RESULTS = {
    "machine": {"slug": "cpu-2c", "label": "Test CPU (2 cores, no GPU); onnxruntime 1.0", "libraries": {"x": "1"}},
    "latency": [_lat("teacher", "onnxruntime", 1, 10.0), _lat("teacher", "onnxruntime", 32, 100.0),
                _lat("student", "onnxruntime", 1, 1.0), _lat("student", "onnxruntime", 32, 5.0),
                _lat("student", "onnxruntime", 32, 4.0, "int8"), _lat("teacher", "torch-eager", 32, 300.0)],
    "accuracy": [{"model": "teacher", "runtime": "torch", "variant": "fp32", "n": 100, "accuracy": 0.9,
                  "macro_f1": 0.9, "auc": 0.99, "retention": 1.0, "fidelity": 1.0},
                 {"model": "student", "runtime": "onnxruntime", "variant": "fp32", "n": 100, "accuracy": 0.88,
                  "macro_f1": 0.87, "auc": 0.98, "retention": 0.88 / 0.9, "fidelity": 0.95}],
    "serving": [_srv("echo", "echo", 1, 1000, 0.5), _srv("echo", "echo", 32, 4000, 8.0),
                _srv("mmkd-serve", "student", 1, 600, 1.5), _srv("mmkd-serve", "student", 32, 3000, 10.0),
                _srv("mmkd-serve", "student", 32, 1000, 30.0, batching="off"),
                _srv("mmkd-serve", "student", 32, 2500, 12.0, api="kserve", p99=20.0),
                _srv("mmkd-serve", "teacher", 32, 300, 100.0), _srv("mmkd-serve", "teacher", 32, 150, 200, "off"),
                _srv("pytriton", "student", 32, 1000, 30.0, api="kserve", p99=60.0)],
    "notes": ["a note"],
}


def _status(results):
    return {g["goal"].split(" >=")[0].split(" within")[0]: g["status"] for g in acceptance(results)}


def test_acceptance_passes_when_numbers_meet_goals():
    goals = acceptance(RESULTS)
    assert [g["status"] for g in goals] == ["PASS"] * 7, goals
    assert "20.00x" in goals[0]["measured"]  # (32/5 ms) / (32/100 ms): computed, not hard-coded


def test_acceptance_misses_and_na_follow_the_data():
    worse = copy.deepcopy(RESULTS)
    worse["latency"][2]["p50_ms"] = 4.0  # student batch 1 only 2.5x faster than the teacher
    worse["serving"] = [r for r in worse["serving"] if r["target"] != "pytriton"]
    worse["serving"][2]["p50_ms"] = 5.5  # served c=1 p50 is 1.5 ms over in-process batch 1 (4.0 ms)
    goals = acceptance(worse)
    assert [g["status"] for g in goals] == ["PASS", "MISS", "PASS", "PASS", "PASS", "N/A", "MISS"], goals
    assert "+1.500 ms" in goals[6]["measured"] and "PyTriton peer not measured" in goals[5]["measured"]


def _with_cpu(results):
    out = copy.deepcopy(results)
    out["machine"]["cores"] = 2
    for row in out["serving"]:
        row.update(server_cpu_ms=0.2, client_cpu_ms=0.3) if row["target"] == "echo" else None
        row.update(server_cpu_ms=0.5, client_cpu_ms=0.3) if row["model"] == "teacher" else None
        if "server_cpu_ms" in row:  # cores busy = requests/s x CPU seconds per request, as benchmarks/cpu.py measures
            row.update(server_cores=row["throughput"] * row["server_cpu_ms"] / 1000,
                       client_cores=row["throughput"] * row["client_cpu_ms"] / 1000)
    return out


def test_time_budget_shows_cpu_per_request_and_the_cost_over_echo():
    results = _with_cpu(RESULTS)
    rows = {(r["target"], r["model"], r["batching"]): r for r in time_budget(results["serving"], cores=2)}
    assert set(rows) == {("echo", "echo", "on"), ("mmkd-serve", "teacher", "on"), ("mmkd-serve", "teacher", "off")}
    teacher = rows[("mmkd-serve", "teacher", "on")]
    assert teacher["over_echo_ms"] == 0.3 and teacher["rps"] == 300  # 0.5 - 0.2 ms; its saturation row
    # 300 req/s x 0.5 ms = 0.15 server cores, x 0.3 ms = 0.09 load generator cores, of 2
    assert abs(teacher["idle_cores"] - (2 - 0.15 - 0.09)) < 1e-9
    assert time_budget(results["serving"])[0]["idle_cores"] is None  # machine's cores unknown: nothing claimed


def test_cpu_bound_adds_the_echo_cost_to_in_process_compute():
    bounds = {b["model"]: b for b in cpu_bound(_with_cpu(RESULTS))}
    # teacher ceiling 320 samples/s (32 per 100 ms); echo costs 0.5 ms CPU per request on 2 cores
    assert abs(bounds["teacher"]["bound_rps"] - 1 / (1 / 320 + 0.0005 / 2)) < 1e-9
    assert abs(bounds["teacher"]["server_of_bound"] - 300 * (1 / 320 + 0.0005 / 2)) < 1e-9
    goal = next(g for g in acceptance(_with_cpu(RESULTS)) if g["goal"].startswith("teacher"))
    assert "this machine allows at most 92.6%" in goal["measured"]  # 296.3 / 320
    assert cpu_bound(RESULTS) == []  # no CPU readings: no bound claimed
    results = _with_cpu(RESULTS)
    results["serving"][6]["server_preprocess_ms"] = 1.5  # the teacher's saturation row: preprocessing costs CPU too
    teacher = next(b for b in cpu_bound(results) if b["model"] == "teacher")
    assert abs(teacher["bound_rps"] - 1 / (1 / 320 + (0.0005 + 0.0015) / 2)) < 1e-9


def test_lone_request_splits_latency_into_echo_engine_and_the_rest():
    results = copy.deepcopy(RESULTS)
    results["serving"][0]["mean_ms"] = 0.6  # echo at concurrency 1
    results["serving"][2].update(mean_ms=1.6, server_total_ms=0.7, server_preprocess_ms=0.2, server_queue_ms=0.05,
                                 server_compute_ms=0.15)
    (row,) = lone_request(results)
    assert row["model"] == "student" and row["echo_ms"] == 0.6 and row["engine_ms"] == 0.7
    assert abs(row["handoff_ms"] - 0.3) < 1e-9  # engine 0.7 - preprocess 0.2 - queue 0.05 - compute 0.15
    assert abs(row["outside_ms"] - 0.3) < 1e-9  # client mean 1.6 - echo 0.6 - engine 0.7
    assert abs(row["floor_ms"] - (0.5 + 0.2 + 1.0)) < 1e-9  # echo p50 + preprocess + in-process batch 1 p50
    goal = next(g for g in acceptance(results) if g["goal"].startswith("student p50"))
    assert "alone take +0.700 ms" in goal["measured"]
    assert lone_request(RESULTS)[0]["handoff_ms"] is None  # no server timings (KServe-like row): nothing derived


def test_batching_gain_per_model():
    gains = {g["model"]: g["gain_x"] for g in batching_gain(RESULTS["serving"])}
    assert gains == {"student": 3.0, "teacher": 2.0}


def test_write_report_renders_tables_plots_and_named_json(tmp_path):
    written = write_report(RESULTS, tmp_path)
    text = (tmp_path / "report.md").read_text()
    for heading in ("## Acceptance", "Speedup: student vs teacher", "Batching gain", "Ours vs PyTriton",
                    "Server vs in-process ceiling and echo floor", "Accuracy and retention"):
        assert heading in text
    assert "Test CPU (2 cores" in text and "- a note" in text
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert pngs == ["latency_by_batch_cpu-2c.png", "latency_vs_throughput_cpu-2c.png"]
    assert all((tmp_path / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    assert (tmp_path / "results_cpu-2c_fp32-int8.json").is_file() and "report.md" in written
    saved = json.loads((tmp_path / "results.json").read_text())
    assert [g["status"] for g in saved["acceptance"]] == ["PASS"] * 7


def test_empty_results_still_render():
    text = render_markdown({"machine": {}}, [])
    assert "N/A" in text and "_no rows_" in text
