"""Turn a results dict into results.json, report.md and PNG plots: the benchmark as people read it.

The results dict (what `mmkd-bench` collects):

    machine   MachineInfo.to_dict()
    settings  what was run (quick or full, timing plans, server knobs)
    latency   rows from benchmarks.latency (model, runtime, variant, provider, batch, p50_ms ... throughput)
    accuracy  rows from benchmarks.accuracy (model, runtime, variant, accuracy, macro_f1, auc, retention, fidelity)
    serving   rows from benchmarks.loadgen plus target (mmkd-serve | echo | pytriton), model, variant,
              batching (on | off), api (mmkd | kserve), max_batch_size
    notes     free-text lines (a section skipped and why, the peer unavailable and why)

Every goal of the acceptance list is computed here from those rows and printed as PASS or MISS with the measured
numbers; a goal whose rows are missing is N/A with the reason. Nothing is hard-coded.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

# ------------------------------------------------------------------------------------------------------------
# Row selection
# ------------------------------------------------------------------------------------------------------------


def pick(rows: Iterable[dict], **match: Any) -> list[dict]:
    return [r for r in rows if all(r.get(k) == v for k, v in match.items())]


def one(rows: Iterable[dict], **match: Any) -> dict | None:
    found = pick(rows, **match)
    return found[0] if found else None


def best(rows: Iterable[dict], key: str = "throughput") -> dict | None:
    rows = [r for r in rows if _finite(r.get(key))]
    return max(rows, key=lambda r: r[key]) if rows else None


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def fmt(x: Any, digits: int = 2) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        if not math.isfinite(x):
            return "–"
        return f"{x:,.{digits}f}"
    return str(x)


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if _finite(a) and _finite(b) and b else None


# ------------------------------------------------------------------------------------------------------------
# Derived tables
# ------------------------------------------------------------------------------------------------------------


def speedups(latency: list[dict]) -> list[dict]:
    """Student vs teacher at each batch size: throughput ratio and p50 ratio, per student variant/runtime."""
    out = []
    base_keys = [("onnxruntime", "fp32"), ("torch-eager", "fp32")]
    for student in pick(latency, model="student"):
        for key in base_keys:
            teacher = next((t for t in pick(latency, model="teacher", runtime=key[0], variant=key[1])
                            if t["batch"] == student["batch"]), None)
            if teacher is None:
                continue
            out.append({"batch": student["batch"], "student": f"{student['runtime']} {student['variant']}",
                        "teacher": f"{teacher['runtime']} {teacher['variant']}",
                        "throughput_x": ratio(student["throughput"], teacher["throughput"]),
                        "p50_x": ratio(teacher["p50_ms"], student["p50_ms"])})
    return out


def batching_gain(serving: list[dict]) -> list[dict]:
    """Best closed-loop throughput with dynamic batching on vs off, per model."""
    out = []
    for model in sorted({r["model"] for r in pick(serving, target="mmkd-serve")}):
        on = best(pick(serving, target="mmkd-serve", model=model, batching="on", shape="closed", api="mmkd"))
        off = best(pick(serving, target="mmkd-serve", model=model, batching="off", shape="closed", api="mmkd"))
        if on and off:
            out.append({"model": model, "on_rps": on["throughput"], "on_concurrency": on["concurrency"],
                        "off_rps": off["throughput"], "off_concurrency": off["concurrency"],
                        "gain_x": ratio(on["throughput"], off["throughput"])})
    return out


def server_vs_references(results: dict) -> list[dict]:
    """Each model's best server throughput beside the in-process ceiling and the echo floor."""
    serving, latency = results.get("serving", []), results.get("latency", [])
    out = []
    for model in sorted({r["model"] for r in pick(serving, target="mmkd-serve")}):
        srv = best(pick(serving, target="mmkd-serve", model=model, batching="on", shape="closed", api="mmkd"))
        if not srv:
            continue
        variant = srv.get("variant", "fp32")
        batch = srv.get("max_batch_size")
        ceiling = one(latency, model=model, runtime="onnxruntime", variant=variant, batch=batch)
        echo = one(serving, target="echo", shape="closed", concurrency=srv["concurrency"])
        out.append({"model": model, "variant": variant, "concurrency": srv["concurrency"],
                    "server_rps": srv["throughput"], "ceiling_batch": batch,
                    "ceiling_rps": ceiling["throughput"] if ceiling else None,
                    "of_ceiling": ratio(srv["throughput"], ceiling["throughput"] if ceiling else None),
                    "echo_rps": echo["throughput"] if echo else None,
                    "of_echo": ratio(srv["throughput"], echo["throughput"] if echo else None),
                    "preprocess_ms": srv.get("server_preprocess_ms")})
    return out


def time_budget(serving: list[dict], cores: int | None = None) -> list[dict]:
    """Where a request's time goes at each server's saturation (its best closed-loop row per API and batching):
    CPU milliseconds per answered request in the server process group and in the load generator, the cores each
    kept busy, and the server's own per-request timings. `server over echo` is the server's CPU per request
    beyond a bare grpc.aio handler answering the same payload: the cost of decoding, batching, ONNX Runtime,
    metrics and Python, to be cut before anything else. `idle cores` is what server and load generator left
    unused at saturation: a server saturated with cores idle is bound by a lock or a thread, not by the CPU."""
    echo = best(pick(serving, target="echo", shape="closed"))
    keys = sorted({(r["target"], r["model"], r.get("batching", ""), r.get("api", "")) for r in serving
                   if r.get("shape") == "closed"}, key=lambda k: (k[0] != "echo", k))
    out = []
    for target, model, batching, api in keys:
        row = best(pick(serving, target=target, model=model, batching=batching, api=api, shape="closed"))
        if not row or row.get("server_cpu_ms") is None:
            continue
        batch = row.get("server_batch")
        compute = row.get("server_compute_ms")
        out.append({"target": target, "model": model, "batching": batching, "api": api,
                    "concurrency": row["concurrency"], "rps": row["throughput"],
                    "server_cpu_ms": row["server_cpu_ms"], "client_cpu_ms": row.get("client_cpu_ms"),
                    "server_cores": row.get("server_cores"), "client_cores": row.get("client_cores"),
                    "over_echo_ms": (row["server_cpu_ms"] - echo["server_cpu_ms"])
                    if echo and echo.get("server_cpu_ms") is not None and target != "echo" else None,
                    "preprocess_ms": row.get("server_preprocess_ms"),
                    "compute_per_request_ms": ratio(compute, batch), "batch": batch,
                    "idle_cores": _idle_cores(cores, row.get("server_cores"), row.get("client_cores"))})
    return out


def _idle_cores(cores: int | None, server: float | None, client: float | None) -> float | None:
    if not cores or server is None or client is None:
        return None
    return max(0.0, cores - server - client)


def cpu_bound(results: dict) -> list[dict]:
    """What this machine allows: a server that costs no more CPU per request than the bare echo server, plus the
    request's preprocessing (decoding and tokenising, as the server measured it at saturation; the in-process
    ceiling times prepared tensors) and the model's in-process compute at the server's batch size, answers at
    most 1 / (1/ceiling + (echo CPU + preprocessing)/cores) requests per second when server, load generator and
    ONNX Runtime share the machine's cores. Set beside the goals, it says which are reachable here at all and which
    are lost to our own server."""
    serving, latency = results.get("serving", []), results.get("latency", [])
    cores = results.get("machine", {}).get("cores")
    echo = best(pick(serving, target="echo", shape="closed"))
    if not cores or not echo or echo.get("server_cpu_ms") is None or echo.get("client_cpu_ms") is None:
        return []
    echo_cpu_s = (echo["server_cpu_ms"] + echo["client_cpu_ms"]) / 1000.0
    out = []
    for ref in server_vs_references(results):
        ceiling = ref.get("ceiling_rps")
        if not ceiling:
            continue
        preprocess_s = ref["preprocess_ms"] / 1000.0 if _finite(ref.get("preprocess_ms")) else 0.0
        bound = 1.0 / (1.0 / ceiling + (echo_cpu_s + preprocess_s) / cores)
        out.append({"model": ref["model"], "ceiling_rps": ceiling, "echo_cpu_ms": echo_cpu_s * 1000.0,
                    "preprocess_ms": preprocess_s * 1000.0, "cores": cores, "bound_rps": bound,
                    "bound_of_ceiling": bound / ceiling,
                    "bound_of_echo": ratio(bound, ref.get("echo_rps")), "server_rps": ref["server_rps"],
                    "server_of_bound": ratio(ref["server_rps"], bound)})
    return out


def lone_request(results: dict) -> list[dict]:
    """Where a lone request's time goes (concurrency 1, own API, batching on), in mean milliseconds.

    The client's latency splits into the echo's round trip (the gRPC floor: the same payload, no work), the
    engine's time (the server-reported `total`: preprocessing, queueing, compute, and the thread hand-offs
    between them) and the rest: gRPC and our handler beyond the echo's (messages, metrics, the event loop).
    `floor` is the p50 of a server that costs nothing beyond the echo's round trip, the request's preprocessing
    as measured in the server and the in-process batch-1 compute: the concurrency-1 goal compares against the
    in-process compute alone, and the floor says how much of its 1 ms the transport and preprocessing take."""
    serving, latency = results.get("serving", []), results.get("latency", [])
    echo = one(serving, target="echo", shape="closed", concurrency=1)
    out = []
    for row in pick(serving, target="mmkd-serve", batching="on", shape="closed", api="mmkd", concurrency=1):
        engine = row.get("server_total_ms")
        parts = [row.get(k) for k in ("server_preprocess_ms", "server_queue_ms", "server_compute_ms")]
        local = one(latency, model=row["model"], runtime="onnxruntime", variant=row.get("variant", "fp32"), batch=1)
        known = (echo is not None and _finite(echo.get("mean_ms")) and _finite(row.get("mean_ms"))
                 and _finite(engine) and all(_finite(x) for x in parts))
        out.append({"model": row["model"], "p50_ms": row["p50_ms"], "mean_ms": row.get("mean_ms"),
                    "echo_ms": echo.get("mean_ms") if echo else None, "engine_ms": engine,
                    "preprocess_ms": parts[0], "queue_ms": parts[1], "compute_ms": parts[2],
                    "handoff_ms": engine - sum(parts) if known else None,
                    "outside_ms": row["mean_ms"] - echo["mean_ms"] - engine if known else None,
                    "in_process_ms": local["p50_ms"] if local else None,
                    "floor_ms": echo["p50_ms"] + parts[0] + local["p50_ms"] if known and local else None})
    return out


def versus_peer(serving: list[dict]) -> list[dict]:
    """Ours vs PyTriton at each common closed-loop concurrency, same client (tritonclient) when available."""
    peer_rows = pick(serving, target="pytriton", shape="closed")
    out = []
    for peer in peer_rows:
        ours = (one(serving, target="mmkd-serve", model=peer["model"], batching="on", shape="closed", api="kserve",
                    concurrency=peer["concurrency"])
                or one(serving, target="mmkd-serve", model=peer["model"], batching="on", shape="closed",
                       api="mmkd", concurrency=peer["concurrency"]))
        if ours:
            out.append({"model": peer["model"], "concurrency": peer["concurrency"], "api": ours["api"],
                        "ours_rps": ours["throughput"], "peer_rps": peer["throughput"],
                        "x": ratio(ours["throughput"], peer["throughput"]),
                        "ours_p99": ours["p99_ms"], "peer_p99": peer["p99_ms"]})
    return out


# ------------------------------------------------------------------------------------------------------------
# Acceptance
# ------------------------------------------------------------------------------------------------------------


def _goal(goal: str, measured: str, ok: bool | None, why: str = "") -> dict:
    status = "N/A" if ok is None else ("PASS" if ok else "MISS")
    return {"goal": goal, "measured": measured if ok is not None else why, "status": status}


def acceptance(results: dict) -> list[dict]:
    """Each acceptance goal with its measured numbers and PASS / MISS / N/A."""
    latency, serving = results.get("latency", []), results.get("serving", [])
    goals = []
    s32 = one(latency, model="student", runtime="onnxruntime", variant="fp32", batch=32)
    t32 = one(latency, model="teacher", runtime="onnxruntime", variant="fp32", batch=32)
    x = ratio(s32 and s32["throughput"], t32 and t32["throughput"])
    goals.append(_goal("student vs teacher (ORT fp32) throughput at batch 32 >= 10x",
                       f"{fmt(x)}x ({fmt(s32 and s32['throughput'], 0)} vs {fmt(t32 and t32['throughput'], 0)} "
                       f"samples/s)", None if x is None else x >= 10, "latency rows for batch 32 missing"))
    s1 = one(latency, model="student", runtime="onnxruntime", variant="fp32", batch=1)
    t1 = one(latency, model="teacher", runtime="onnxruntime", variant="fp32", batch=1)
    x = ratio(t1 and t1["p50_ms"], s1 and s1["p50_ms"])
    goals.append(_goal("student vs teacher (ORT fp32) p50 at batch 1 >= 5x lower",
                       f"{fmt(x)}x ({fmt(s1 and s1['p50_ms'], 3)} vs {fmt(t1 and t1['p50_ms'], 3)} ms)",
                       None if x is None else x >= 5, "latency rows for batch 1 missing"))
    acc = one(results.get("accuracy", []), model="student", runtime="onnxruntime", variant="fp32")
    ret = acc.get("retention") if acc else None
    goals.append(_goal("student accuracy retention (ORT fp32 vs teacher) >= 97%", f"{fmt(ret and ret * 100, 1)}%",
                       None if ret is None else ret >= 0.97, "accuracy section not run"))
    refs = {r["model"]: r for r in server_vs_references(results)}
    t = refs.get("teacher")
    bounds = {r["model"]: r for r in cpu_bound(results)}
    tb = bounds.get("teacher")
    allows = f"; this machine allows at most {fmt(tb['bound_of_ceiling'] * 100, 1)}%" if tb else ""
    goals.append(_goal("teacher through the server >= 85% of in-process ORT at the same batch size",
                       f"{fmt(t and t['of_ceiling'] and t['of_ceiling'] * 100, 1)}% ({fmt(t and t['server_rps'], 0)} "
                       f"vs {fmt(t and t['ceiling_rps'], 0)} req/s at batch {t and t['ceiling_batch']}){allows}",
                       None if not t or t["of_ceiling"] is None else t["of_ceiling"] >= 0.85,
                       "teacher serving rows or in-process row at the server's batch size missing"))
    s = refs.get("student")
    sb = bounds.get("student")
    allows = (f"; this machine allows at most {fmt(sb['bound_of_echo'] * 100, 1)}%"
              if sb and sb["bound_of_echo"] is not None else "")
    goals.append(_goal("student through the server >= 60% of the echo floor at the same concurrency",
                       f"{fmt(s and s['of_echo'] and s['of_echo'] * 100, 1)}% ({fmt(s and s['server_rps'], 0)} vs "
                       f"{fmt(s and s['echo_rps'], 0)} req/s at concurrency {s and s['concurrency']}){allows}",
                       None if not s or s["of_echo"] is None else s["of_echo"] >= 0.6,
                       "student serving rows or echo rows missing"))
    peer = versus_peer(serving)
    top = max(peer, key=lambda r: r["concurrency"]) if peer else None
    goals.append(_goal("student served >= 1.5x PyTriton throughput at no worse p99",
                       f"{fmt(top and top['x'])}x at concurrency {top and top['concurrency']}; p99 "
                       f"{fmt(top and top['ours_p99'])} vs {fmt(top and top['peer_p99'])} ms",
                       None if not top or top["x"] is None else (top["x"] >= 1.5 and top["ours_p99"] <= top["peer_p99"]),
                       "PyTriton peer not measured (see notes)"))
    c1 = one(serving, target="mmkd-serve", model="student", batching="on", shape="closed", api="mmkd", concurrency=1)
    d = (c1["p50_ms"] - s1["p50_ms"]) if c1 and s1 else None
    lone = one(lone_request(results), model="student")
    floor = (f"; the echo's round trip and the preprocessing alone take "
             f"+{fmt(lone['floor_ms'] - lone['in_process_ms'], 3)} ms") if lone and lone["floor_ms"] else ""
    goals.append(_goal("student p50 at concurrency 1 within 1 ms of in-process batch 1",
                       f"+{fmt(d, 3)} ms ({fmt(c1 and c1['p50_ms'], 3)} vs {fmt(s1 and s1['p50_ms'], 3)} ms){floor}",
                       None if d is None else d <= 1.0, "serving at concurrency 1 or latency batch 1 missing"))
    return goals


# ------------------------------------------------------------------------------------------------------------
# Markdown
# ------------------------------------------------------------------------------------------------------------


def table(rows: list[dict], columns: list[tuple[str, str]], digits: int = 2) -> str:
    """A markdown table of `rows` with (key, header) columns."""
    if not rows:
        return "_no rows_\n"
    head = "| " + " | ".join(h for _, h in columns) + " |"
    sep = "| " + " | ".join("---" for _ in columns) + " |"
    body = ["| " + " | ".join(_cell(r.get(k), digits) for k, _ in columns) + " |" for r in rows]
    return "\n".join([head, sep, *body]) + "\n"


def _cell(value: Any, digits: int) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k} {v}" for k, v in value.items()) or "0"
    return fmt(value, digits)


def render_markdown(results: dict, plots: list[str]) -> str:
    machine = results.get("machine", {})
    lines = [f"# mmkd benchmark — {machine.get('slug', '?')}", "",
             f"Machine: {machine.get('label', '?')}", "",
             f"Libraries: {', '.join(f'{k} {v}' for k, v in machine.get('libraries', {}).items())}", "",
             f"Settings: `{json.dumps(results.get('settings', {}), sort_keys=True)}`", "",
             "## Acceptance", "", table(acceptance(results), [("goal", "goal"), ("measured", "measured"),
                                                              ("status", "status")])]
    sections = [
        ("Model latency (in-process)", results.get("latency", []),
         [("model", "model"), ("runtime", "runtime"), ("variant", "variant"), ("provider", "provider"),
          ("batch", "batch"), ("p50_ms", "p50 ms"), ("p90_ms", "p90 ms"), ("p99_ms", "p99 ms"),
          ("throughput", "samples/s"), ("calls", "calls")]),
        ("Speedup: student vs teacher", speedups(results.get("latency", [])),
         [("batch", "batch"), ("student", "student"), ("teacher", "teacher"), ("throughput_x", "throughput ×"),
          ("p50_x", "p50 ×")]),
        ("Accuracy and retention", results.get("accuracy", []),
         [("model", "model"), ("runtime", "runtime"), ("variant", "variant"), ("n", "n"), ("accuracy", "accuracy"),
          ("macro_f1", "macro-F1"), ("auc", "AUC"), ("retention", "retention"), ("fidelity", "fidelity")]),
        ("Serving (load generator in its own process)", results.get("serving", []),
         [("target", "target"), ("model", "model"), ("variant", "variant"), ("batching", "batching"),
          ("api", "api"), ("shape", "shape"), ("concurrency", "concurrency"), ("rate", "rate/s"),
          ("throughput", "req/s"), ("p50_ms", "p50 ms"), ("p95_ms", "p95 ms"), ("p99_ms", "p99 ms"),
          ("errors", "errors"), ("server_compute_ms", "server compute ms"), ("server_queue_ms", "queue ms"),
          ("server_preprocess_ms", "preprocess ms"), ("server_batch", "mean batch")]),
        ("Batching gain (dynamic batching on vs --max-batch-size 1)", batching_gain(results.get("serving", [])),
         [("model", "model"), ("on_rps", "on req/s"), ("on_concurrency", "at conc."), ("off_rps", "off req/s"),
          ("off_concurrency", "at conc."), ("gain_x", "gain ×")]),
        ("Server vs in-process ceiling and echo floor", server_vs_references(results),
         [("model", "model"), ("variant", "variant"), ("concurrency", "concurrency"), ("server_rps", "server req/s"),
          ("ceiling_batch", "ceiling batch"), ("ceiling_rps", "ceiling samples/s"), ("of_ceiling", "of ceiling"),
          ("echo_rps", "echo req/s"), ("of_echo", "of echo")]),
        ("Where a request's time goes (CPU per request at each server's saturation)",
         time_budget(results.get("serving", []), results.get("machine", {}).get("cores")),
         [("target", "target"), ("model", "model"), ("batching", "batching"), ("api", "api"),
          ("concurrency", "concurrency"), ("rps", "req/s"), ("server_cpu_ms", "server CPU ms/req"),
          ("client_cpu_ms", "load gen CPU ms/req"), ("server_cores", "server cores"),
          ("client_cores", "load gen cores"), ("idle_cores", "idle cores"),
          ("over_echo_ms", "server over echo ms/req"),
          ("preprocess_ms", "preprocess ms"), ("compute_per_request_ms", "ORT ms/req"), ("batch", "mean batch")]),
        ("What this machine allows (echo's CPU per request + preprocessing + in-process compute)",
         cpu_bound(results),
         [("model", "model"), ("ceiling_rps", "ceiling samples/s"), ("echo_cpu_ms", "echo CPU ms/req"),
          ("preprocess_ms", "preprocess ms/req"), ("cores", "cores"), ("bound_rps", "bound req/s"),
          ("bound_of_ceiling", "bound of ceiling"),
          ("bound_of_echo", "bound of echo"), ("server_rps", "server req/s"), ("server_of_bound", "server of bound")]),
        ("Where a lone request's time goes (concurrency 1; milliseconds, means except the p50 columns)",
         lone_request(results),
         [("model", "model"), ("p50_ms", "p50"), ("mean_ms", "mean"), ("echo_ms", "echo round trip"),
          ("engine_ms", "engine"), ("preprocess_ms", "of it preprocess"), ("queue_ms", "queue"),
          ("compute_ms", "compute"), ("handoff_ms", "hand-offs"), ("outside_ms", "gRPC + handler over echo"),
          ("in_process_ms", "in-process batch 1 p50"), ("floor_ms", "floor p50")]),
        ("Ours vs PyTriton (same model, same load)", versus_peer(results.get("serving", [])),
         [("model", "model"), ("concurrency", "concurrency"), ("api", "our API"), ("ours_rps", "ours req/s"),
          ("peer_rps", "PyTriton req/s"), ("x", "×"), ("ours_p99", "ours p99 ms"), ("peer_p99", "PyTriton p99 ms")]),
    ]
    for title, rows, cols in sections:
        lines += [f"## {title}", "", table(rows, cols)]
    if plots:
        lines += ["## Plots", ""] + [f"![{Path(p).stem}]({Path(p).name})" for p in plots] + [""]
    if results.get("notes"):
        lines += ["## Notes", ""] + [f"- {n}" for n in results["notes"]] + [""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------------
# Plots
# ------------------------------------------------------------------------------------------------------------


def _variants(results: dict) -> str:
    found = sorted({f"{r['model']} {r['variant']}" for r in results.get("latency", []) + results.get("serving", [])
                    if r.get("model") and r.get("variant")})
    return ", ".join(found)


def plot_latency_vs_throughput(results: dict, path: Path) -> Path | None:
    """p50 (solid) and p99 (dashed) against achieved throughput, one line per server/model/batching/api."""
    rows = pick(results.get("serving", []), shape="closed")
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5))
    groups = sorted({(r["target"], r.get("model", ""), r.get("batching", ""), r.get("api", "")) for r in rows})
    for group in groups:
        series = sorted(pick(rows, target=group[0], model=group[1], batching=group[2], api=group[3]),
                        key=lambda r: r["concurrency"])
        label = " ".join(x for x in (group[0], group[1], f"batching {group[2]}" if group[2] else "", group[3]) if x)
        line, = ax.plot([r["throughput"] for r in series], [r["p50_ms"] for r in series], marker="o", label=label)
        ax.plot([r["throughput"] for r in series], [r["p99_ms"] for r in series], ls="--", color=line.get_color())
    ax.set_xlabel("throughput (requests/s)")
    ax.set_ylabel("latency (ms): p50 solid, p99 dashed")
    ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    _title(ax, "Latency vs throughput (closed loop, concurrency 1…N)", results)
    return _save(fig, path)


def plot_latency_by_batch(results: dict, path: Path) -> Path | None:
    """In-process p50 per call against batch size, one line per model/runtime/variant."""
    rows = results.get("latency", [])
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5))
    for model, runtime, variant in sorted({(r["model"], r["runtime"], r["variant"]) for r in rows}):
        series = sorted(pick(rows, model=model, runtime=runtime, variant=variant), key=lambda r: r["batch"])
        ax.plot([r["batch"] for r in series], [r["p50_ms"] for r in series], marker="o",
                label=f"{model} {runtime} {variant}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size")
    ax.set_ylabel("p50 latency per call (ms)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    _title(ax, "Model latency by batch size (in-process)", results)
    return _save(fig, path)


def _title(ax: Any, what: str, results: dict) -> None:
    machine = results.get("machine", {}).get("label", "unknown machine")
    ax.set_title(f"{what}\n{machine}\nvariants: {_variants(results)}", fontsize=8)


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.tight_layout()
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path


# ------------------------------------------------------------------------------------------------------------
# Writing
# ------------------------------------------------------------------------------------------------------------


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_report(results: dict, out_dir: str | Path) -> dict[str, Path]:
    """Write results.json, a copy named by device and precision, report.md and the plots; return their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    slug = results.get("machine", {}).get("slug", "unknown")
    results = {**results, "acceptance": acceptance(results)}
    written: dict[str, Path] = {}
    plots = [p for p in (plot_latency_vs_throughput(results, out / f"latency_vs_throughput_{slug}.png"),
                         plot_latency_by_batch(results, out / f"latency_by_batch_{slug}.png")) if p]
    for plot in plots:
        written[plot.stem] = plot
    text = json.dumps(results, indent=2, sort_keys=True, default=str)
    variants = "-".join(sorted({r["variant"] for r in results.get("latency", []) if "variant" in r})) or "none"
    for name in ("results.json", f"results_{slug}_{variants}.json"):
        _atomic_text(out / name, text)
        written[name] = out / name
    _atomic_text(out / "report.md", render_markdown(results, [str(p) for p in plots]))
    written["report.md"] = out / "report.md"
    return written
