"""Overload and soak: open-loop load against a running server, with memory and metrics read around it.

Overload: measure capacity (closed loop), then offer `factor` x capacity for `duration_s`, then drop to half the
capacity for `recovery_s`. Admitted requests must keep a bounded p99, the rest must be refused quickly with
RESOURCE_EXHAUSTED (or DEADLINE_EXCEEDED when they expired while queued: never computed, and counted in
mmkd_dropped_total{reason="expired"}), memory must stay flat, and every request after the load drops is answered.

Soak: `fraction` x capacity for `duration_s` with `invalid_ratio` malformed requests mixed in: zero failed valid
requests, resident memory growth after warm-up <= 10 %, p99 stable (the second half after warm-up within 2x of the
first; per-window p99 is reported too, but on a shared machine single windows are noisy).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable

from benchmarks.robustness import corpus
from benchmarks.robustness import images as im
from benchmarks.robustness.client import Caller
from benchmarks.robustness.corpus import Case
from benchmarks.robustness.load import MemorySampler, Record, capacity, open_loop, p
from benchmarks.robustness.target import metric

OVERLOAD_CODES = {"OK", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED"}
QUICK_REJECT_MS = 100.0
RSS_GROWTH_LIMIT = 0.10


def valid_maker(model: str, kinds: int = 8) -> Callable[[int], Case]:
    """Request i: one of a few pre-encoded valid requests over both APIs."""
    cases = []
    for i in range(kinds):
        image, text = im.rgb(500 + i, size=32), corpus.GOOD_TEXT
        cases.append(Case("valid", "mmkd", corpus.classify(model, image, text), corpus.OK) if i % 2 == 0 else
                     Case("valid", "kserve", corpus.infer(model, [image], [text.encode()]), corpus.OK))
    return lambda i: cases[i % len(cases)]


def mixed_maker(model: str, invalid_ratio: float, seed: int = 0) -> Callable[[int], Case]:
    """Valid requests with every 1/invalid_ratio-th one drawn from the fuzz generator."""
    valid = valid_maker(model)
    invalid = [c for c in corpus.generate(model, 500, seed) if c.malformed]
    every = max(1, round(1 / invalid_ratio)) if invalid_ratio > 0 else 0
    return lambda i: invalid[i % len(invalid)] if every and i % every == every - 1 else valid(i)


def summarize(records: list[Record], duration_s: float) -> dict:
    """Latency from the due time (`*_ms`) and from the real send (`*_rtt_ms`): when the client itself falls
    behind (`client_lag_p99_ms`, CLIENT_OVERLOAD), only the rtt figures describe the server."""
    codes = Counter(r.code for r in records)
    ok = [r for r in records if r.code == "OK"]
    rejected = [r.rtt_s for r in records if r.code == "RESOURCE_EXHAUSTED"]
    sent = [r for r in records if r.code != "CLIENT_OVERLOAD"]
    return {"sent": len(records), "offered_rps": round(len(records) / duration_s, 1),
            "really_sent_rps": round(len(sent) / duration_s, 1), "ok_rps": round(len(ok) / duration_s, 1),
            "codes": dict(codes), "ok_p50_ms": p([r.latency_s for r in ok], 50),
            "ok_p99_ms": p([r.latency_s for r in ok], 99), "ok_rtt_p50_ms": p([r.rtt_s for r in ok], 50),
            "ok_rtt_p99_ms": p([r.rtt_s for r in ok], 99), "ok_rtt_max_ms": p([r.rtt_s for r in ok], 100),
            "rejected_rtt_p50_ms": p(rejected, 50), "rejected_rtt_p99_ms": p(rejected, 99),
            "client_lag_p99_ms": p([r.latency_s - r.rtt_s for r in sent], 99)}


async def run_overload(caller: Caller, model: str, *, read_rss: Callable[[], float], read_metrics: Callable[[], dict],
                       duration_s: float = 60.0, factor: float = 2.0, recovery_s: float = 10.0,
                       capacity_s: float = 5.0, timeout_s: float = 2.0, capacity_rps: float | None = None,
                       max_outstanding: int = 512) -> dict:
    """Checks are True/False; the latency checks are None (inconclusive) when the client could not send the
    offered rate (`client_limited`): then its own event loop, not the server, dominates the timings."""
    make = valid_maker(model)
    measured = capacity_rps or await capacity(caller, make, capacity_s)
    before_metrics = read_metrics()
    with MemorySampler(read_rss) as memory:
        rss_before = read_rss()
        t0 = time.monotonic()
        load = await open_loop(caller, make, measured * factor, duration_s, timeout_s=timeout_s,
                               max_outstanding=max_outstanding)
        rss_after_load = read_rss()
        recover = await open_loop(caller, make, measured * 0.5, recovery_s, timeout_s=timeout_s,
                                  offset_s=time.monotonic() - t0)
        rss_after = read_rss()
    after_metrics = read_metrics()
    delta = lambda name, **lb: metric(after_metrics, name, **lb) - metric(before_metrics, name, **lb)  # noqa: E731
    overload, recovery = summarize(load, duration_s), summarize(recover, recovery_s)
    server = {"computed": delta("mmkd_batch_size_sum", model=model),
              "ok": delta("mmkd_requests_total", model=model, code="OK"),
              "cancelled": delta("mmkd_requests_total", model=model, code="CANCELLED"),
              "deadline_exceeded": delta("mmkd_requests_total", model=model, code="DEADLINE_EXCEEDED"),
              **{f"dropped_{r}": delta("mmkd_dropped_total", model=model, reason=r)
                 for r in ("queue_full", "expired", "cancelled")}}
    client_limited = overload["really_sent_rps"] < 0.9 * measured * factor
    latency_check = lambda ok: None if client_limited else ok  # noqa: E731 - a saturated client measures itself
    checks = {
        "only_ok_rejected_or_expired": set(overload["codes"]) - {"CLIENT_OVERLOAD"} <= OVERLOAD_CODES,
        "server_saw_overload": overload["codes"].get("RESOURCE_EXHAUSTED", 0) > 0,
        "rejections_quick": latency_check((overload["rejected_rtt_p99_ms"] or 0.0) <= QUICK_REJECT_MS),
        "admitted_p99_bounded": latency_check((overload["ok_rtt_p99_ms"] or 0.0) <= timeout_s * 1000.0),
        "rss_flat": rss_after_load <= rss_before * (1 + RSS_GROWTH_LIMIT),
        "recovers": recovery["codes"] == {"OK": recovery["sent"]},
        # expired requests never reach compute: everything computed was answered, or cancelled mid-compute
        "expired_never_computed": server["computed"] <= server["ok"] + server["cancelled"],
    }
    return {"capacity_rps": round(measured, 1), "factor": factor, "duration_s": duration_s, "timeout_s": timeout_s,
            "client_limited": client_limited,
            "overload": overload, "recovery": recovery, "server_metrics": server,
            "rss_mb": {"before": rss_before, "after_overload": rss_after_load, "after_recovery": rss_after,
                       "peak": max((mb for _, mb in memory.samples), default=rss_after)},
            "rss_samples": memory.samples, "checks": checks,
            "passed": all(v is not False for v in checks.values())}


async def run_soak(caller: Caller, model: str, *, read_rss: Callable[[], float], duration_s: float = 600.0,
                   fraction: float = 0.7, invalid_ratio: float = 0.1, windows: int = 10, warmup_frac: float = 0.2,
                   capacity_s: float = 5.0, timeout_s: float = 10.0, capacity_rps: float | None = None) -> dict:
    measured = capacity_rps or await capacity(caller, valid_maker(model), capacity_s)
    rate = measured * fraction
    with MemorySampler(read_rss, every_s=max(1.0, duration_s / 200)) as memory:
        records = await open_loop(caller, mixed_maker(model, invalid_ratio), rate, duration_s, timeout_s=timeout_s)
    warmup = duration_s * warmup_frac
    valid = [r for r in records if r.valid]
    failed_valid = sum(r.code != "OK" for r in valid)
    wrong_invalid = sum(not r.expected for r in records if not r.valid)
    width = duration_s / windows
    p99s = [p([r.latency_s for r in valid if i * width <= r.due_s < (i + 1) * width and r.code == "OK"], 99)
            for i in range(windows)]
    rss_warm, rss_end = memory.at(warmup), (memory.samples[-1][1] if memory.samples else None)
    growth = (rss_end - rss_warm) / rss_warm if rss_warm and rss_end else None
    # drift, not noise: p99 of the second half after warm-up over the first half's (a leak or a backlog grows it)
    middle = warmup + (duration_s - warmup) / 2
    halves = [p([r.latency_s for r in valid if lo <= r.due_s < hi and r.code == "OK"], 99)
              for lo, hi in ((warmup, middle), (middle, duration_s + 1))]
    stability = round(halves[1] / halves[0], 2) if None not in halves and halves[0] else None
    checks = {"zero_failed_valid": failed_valid == 0, "invalid_get_their_codes": wrong_invalid == 0,
              "rss_growth_le_10pct": growth is not None and growth <= RSS_GROWTH_LIMIT,
              "p99_drift_le_2x": stability is not None and stability <= 2.0}
    return {"capacity_rps": round(measured, 1), "rate_rps": round(rate, 1), "duration_s": duration_s,
            "invalid_ratio": invalid_ratio, "sent": len(records), "valid_sent": len(valid),
            "valid_failed": failed_valid, "invalid_sent": len(records) - len(valid),
            "invalid_wrong_code": wrong_invalid,
            "codes": dict(Counter(r.code for r in records)), "window_s": width, "window_p99_ms": p99s,
            "p99_halves_after_warmup_ms": halves, "p99_second_over_first_half": stability,
            "rss_mb": {"start": memory.samples[0][1] if memory.samples else None, "after_warmup": rss_warm,
                       "end": rss_end, "growth_after_warmup_pct": None if growth is None else round(100 * growth, 2)},
            "rss_samples": memory.samples, "checks": checks, "passed": all(checks.values())}
