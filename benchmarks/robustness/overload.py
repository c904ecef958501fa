"""Overload and soak: open-loop load from several worker processes (`workers.py`) against a running server, with
memory and metrics read around it.

Overload: measure capacity (closed loop), then offer `factor` x capacity for `duration_s`, then drop to half the
capacity for `recovery_s`. Admitted requests must keep a bounded p99, the rest must be refused quickly with
RESOURCE_EXHAUSTED (or DEADLINE_EXCEEDED when they expired while queued: never computed, and counted in
mmkd_dropped_total{reason="expired"}), memory must stay flat, and every request after the load drops is answered.

Soak: `fraction` x capacity for `duration_s` with `invalid_ratio` malformed requests mixed in: zero failed valid
requests, resident memory growth after warm-up <= 10 %, p99 stable (the second half after warm-up within 2x of the
first; per-window p99 is reported too, but on a shared machine single windows are noisy).

Every report gives the rate offered (the schedule) beside the rate achieved (requests really sent per second): when
the load generator falls short of the schedule the run is `client_limited` and its latency checks inconclusive.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from collections.abc import Callable

from benchmarks.robustness.load import MemorySampler, Record, p
from benchmarks.robustness.target import metric
from benchmarks.robustness.workers import LoadPool, Phase, default_workers

OVERLOAD_CODES = {"OK", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED"}
QUICK_REJECT_MS = 100.0
RSS_GROWTH_LIMIT = 0.10
CLIENT_SHORTFALL = 0.9  # achieved below 90 % of offered: the client, not the server, set the pace


def summarize(records: list[Record], duration_s: float) -> dict:
    """Latency from the due time (`*_ms`) and from the real send (`*_rtt_ms`): when the client itself falls
    behind (`client_lag_p99_ms`, CLIENT_OVERLOAD), only the rtt figures describe the server. `achieved_rps`
    counts requests really sent over the time it took to send them (a lagging client sends past the window)."""
    codes = Counter(r.code for r in records)
    sent = [r for r in records if r.code != "CLIENT_OVERLOAD"]
    ok = [r for r in records if r.code == "OK"]
    rejected = [r.rtt_s for r in records if r.code == "RESOURCE_EXHAUSTED"]
    span = max([duration_s] + [r.sent_s for r in sent])
    return {"due": len(records), "sent": len(sent), "offered_rps": round(len(records) / duration_s, 1),
            "achieved_rps": round(len(sent) / span, 1), "ok_rps": round(len(ok) / duration_s, 1),
            "codes": dict(codes), "ok_p50_ms": p([r.latency_s for r in ok], 50),
            "ok_p99_ms": p([r.latency_s for r in ok], 99), "ok_rtt_p50_ms": p([r.rtt_s for r in ok], 50),
            "ok_rtt_p99_ms": p([r.rtt_s for r in ok], 99), "ok_rtt_max_ms": p([r.rtt_s for r in ok], 100),
            "rejected_rtt_p50_ms": p(rejected, 50), "rejected_rtt_p99_ms": p(rejected, 99),
            "client_lag_p99_ms": p([r.latency_s - r.rtt_s for r in sent], 99)}


def open_phase(rate: float, duration_s: float, timeout_s: float, workers: int, invalid_ratio: float = 0.0,
               max_outstanding: int | None = None) -> Phase:
    """An open-loop phase. By default each worker's cap on outstanding requests covers every request the schedule
    can have in flight before its deadline ends it (+20 %): the cap binds only when the client itself cannot keep
    up, never because the server holds requests (a server that lets a backlog build must be offered the full rate).
    """
    cap = max_outstanding or math.ceil(1.2 * rate * timeout_s / workers) + 32
    return Phase(duration_s, timeout_s, rate=rate, invalid_ratio=invalid_ratio, max_outstanding=cap)


def measure_capacity(pool: LoadPool, duration_s: float, concurrency: int = 32) -> float:
    """Requests per second answered OK with `concurrency` requests in flight, spread over the pool's workers
    (so the measurement is not capped by one client process either)."""
    records = pool.run(Phase(duration_s=duration_s, timeout_s=10.0, concurrency=concurrency))
    return sum(r.code == "OK" for r in records) / duration_s


def server_counters(before: dict, after: dict, model: str) -> dict:
    """What the server counted during the run (Prometheus deltas): computed, answered, expired while queued..."""
    delta = lambda name, **lb: metric(after, name, **lb) - metric(before, name, **lb)  # noqa: E731
    return {"computed": delta("mmkd_batch_size_sum", model=model),
            "ok": delta("mmkd_requests_total", model=model, code="OK"),
            "cancelled": delta("mmkd_requests_total", model=model, code="CANCELLED"),
            "deadline_exceeded": delta("mmkd_requests_total", model=model, code="DEADLINE_EXCEEDED"),
            **{f"dropped_{r}": delta("mmkd_dropped_total", model=model, reason=r)
               for r in ("queue_full", "expired", "cancelled")}}


def run_overload(address: str, model: str, *, read_rss: Callable[[], float], read_metrics: Callable[[], dict],
                 workers: int | None = None, duration_s: float = 60.0, factor: float = 2.0,
                 recovery_s: float = 10.0, capacity_s: float = 5.0, timeout_s: float = 2.0,
                 capacity_rps: float | None = None, max_outstanding: int | None = None, seed: int = 0,
                 image_size: int = 32) -> dict:
    """Checks are True/False; the latency checks are None (inconclusive) when the workers could not send the
    offered rate (`client_limited`): then their own event loops, not the server, dominate the timings.
    `max_outstanding` (per worker) overrides the deadline-derived cap of `open_phase`."""
    workers = workers or default_workers()
    with LoadPool(address, model, workers, seed, image_size) as pool:
        measured = capacity_rps or measure_capacity(pool, capacity_s)
        before_metrics = read_metrics()
        with MemorySampler(read_rss) as memory:
            rss_before = read_rss()
            load = pool.run(open_phase(measured * factor, duration_s, timeout_s, workers,
                                       max_outstanding=max_outstanding))
            rss_after_load = read_rss()
            recover = pool.run(open_phase(measured * 0.5, recovery_s, timeout_s, workers,
                                          max_outstanding=max_outstanding))
            rss_after = read_rss()
        server = server_counters(before_metrics, read_metrics(), model)
    overload, recovery = summarize(load, duration_s), summarize(recover, recovery_s)
    client_limited = overload["achieved_rps"] < CLIENT_SHORTFALL * overload["offered_rps"]
    latency_check = lambda ok: None if client_limited else ok  # noqa: E731 - a saturated client measures itself
    rss_growth = overload_rss_growth(memory, duration_s)
    checks = {
        "only_ok_rejected_or_expired": set(overload["codes"]) - {"CLIENT_OVERLOAD"} <= OVERLOAD_CODES,
        "server_saw_overload": overload["codes"].get("RESOURCE_EXHAUSTED", 0) > 0,
        "rejections_quick": latency_check((overload["rejected_rtt_p99_ms"] or 0.0) <= QUICK_REJECT_MS),
        "admitted_p99_bounded": latency_check((overload["ok_rtt_p99_ms"] or 0.0) <= timeout_s * 1000.0),
        # flat while overloaded: memory steps up once to hold the admitted requests (bounded by the queue and RPC
        # limits), then must not grow; the step itself is reported (rss_mb before / after_overload)
        "rss_flat": rss_growth <= RSS_GROWTH_LIMIT,
        "recovers": recovery["codes"] == {"OK": recovery["due"]},
        # expired requests never reach compute: everything computed was answered, or cancelled mid-compute
        "expired_never_computed": server["computed"] <= server["ok"] + server["cancelled"],
    }
    rss = {"before": rss_before, "after_overload": rss_after_load, "after_recovery": rss_after,
           "peak": max((mb for _, mb in memory.samples), default=rss_after),
           "growth_during_overload_pct": round(100 * rss_growth, 2)}
    return {"capacity_rps": round(measured, 1), "factor": factor, "workers": workers, "duration_s": duration_s,
            "image_size": image_size,
            "timeout_s": timeout_s, "client_limited": client_limited,
            "headline": headline(overload, recovery, server, rss),
            "overload": overload, "recovery": recovery, "server_metrics": server, "rss_mb": rss,
            "rss_samples": memory.samples, "checks": checks,
            "passed": all(v is not False for v in checks.values())}


def overload_rss_growth(memory: MemorySampler, duration_s: float) -> float:
    """Resident memory growth over the overload once it has settled: the largest sample of its last quarter over
    the median of its second eighth (a leak, or a backlog the limits fail to bound, keeps growing)."""
    window = lambda lo, hi: [mb for t, mb in memory.samples if lo <= t < hi]  # noqa: E731
    settled = window(duration_s / 8, duration_s / 4)
    late = window(duration_s * 3 / 4, duration_s)
    if not settled or not late:
        return float("inf")  # too few samples to tell: not flat
    return max(late) / statistics.median(settled) - 1.0


def headline(overload: dict, recovery: dict, server: dict, rss: dict) -> dict:
    """The figures a reader of an overload report looks for first, in one place."""
    return {"offered_rps": overload["offered_rps"], "achieved_rps": overload["achieved_rps"],
            "client_lag_p99_ms": overload["client_lag_p99_ms"],
            "not_sent_client_full": overload["codes"].get("CLIENT_OVERLOAD", 0),
            "admitted_p99_ms": overload["ok_rtt_p99_ms"], "admitted_p99_from_due_ms": overload["ok_p99_ms"],
            "rejected_p50_ms": overload["rejected_rtt_p50_ms"], "rejected_p99_ms": overload["rejected_rtt_p99_ms"],
            "codes": overload["codes"], "expired_while_queued": server["dropped_expired"],
            "rss_before_mb": rss["before"], "rss_after_mb": rss["after_recovery"],
            "recovery": f"{recovery['codes'].get('OK', 0)}/{recovery['due']} OK at {recovery['offered_rps']} req/s, "
                        f"p99 {recovery['ok_rtt_p99_ms']} ms"}


def run_soak(address: str, model: str, *, read_rss: Callable[[], float], workers: int | None = None,
             duration_s: float = 600.0, fraction: float = 0.7, invalid_ratio: float = 0.1, windows: int = 10,
             warmup_frac: float = 0.2, capacity_s: float = 5.0, timeout_s: float = 10.0,
             capacity_rps: float | None = None, seed: int = 0, image_size: int = 32) -> dict:
    """`fraction` x capacity with malformed requests mixed in, from the same worker pool as the overload."""
    workers = workers or default_workers()
    with LoadPool(address, model, workers, seed, image_size) as pool:
        measured = capacity_rps or measure_capacity(pool, capacity_s)
        rate = measured * fraction
        with MemorySampler(read_rss, every_s=max(1.0, duration_s / 200)) as memory:
            records = pool.run(open_phase(rate, duration_s, timeout_s, workers, invalid_ratio))
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
    load = summarize(records, duration_s)
    checks = {"zero_failed_valid": failed_valid == 0, "invalid_get_their_codes": wrong_invalid == 0,
              "rss_growth_le_10pct": growth is not None and growth <= RSS_GROWTH_LIMIT,
              "p99_drift_le_2x": stability is not None and stability <= 2.0}
    return {"capacity_rps": round(measured, 1), "rate_rps": round(rate, 1), "workers": workers,
            "image_size": image_size,
            "offered_rps": load["offered_rps"], "achieved_rps": load["achieved_rps"], "duration_s": duration_s,
            "client_limited": load["achieved_rps"] < CLIENT_SHORTFALL * load["offered_rps"],
            "invalid_ratio": invalid_ratio, "sent": load["sent"], "valid_sent": len(valid),
            "valid_failed": failed_valid, "invalid_sent": len(records) - len(valid),
            "invalid_wrong_code": wrong_invalid, "codes": load["codes"],
            "ok_rtt_p99_ms": load["ok_rtt_p99_ms"], "window_s": width, "window_p99_ms": p99s,
            "p99_halves_after_warmup_ms": halves, "p99_second_over_first_half": stability,
            "rss_mb": {"start": memory.samples[0][1] if memory.samples else None, "after_warmup": rss_warm,
                       "end": rss_end, "growth_after_warmup_pct": None if growth is None else round(100 * growth, 2)},
            "rss_samples": memory.samples, "checks": checks, "passed": all(checks.values())}
