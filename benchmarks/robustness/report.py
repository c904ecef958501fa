"""JSON result files and a short markdown report per run, named by run kind and device."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from benchmarks.machine import MachineInfo


def write_atomic(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)
    return path


def save(out_dir: Path, kind: str, result: dict, machine: MachineInfo) -> tuple[Path, Path]:
    """Write robustness-<kind>-<machine slug>.json and .md (e.g. robustness-fuzz-cpu-2c.json); return both."""
    stem = f"robustness-{kind}-{machine.slug()}"
    data = {"kind": kind, "machine": machine.label(), **result}
    json_path = write_atomic(out_dir / f"{stem}.json", json.dumps(data, indent=2, default=str) + "\n")
    md_path = write_atomic(out_dir / f"{stem}.md", markdown(kind, data))
    return json_path, md_path


def markdown(kind: str, data: dict) -> str:
    lines = [f"# Robustness: {kind}", "", f"Machine: {data['machine']}", "",
             f"Command: `{data.get('command', '')}`", "", f"**{'PASSED' if data.get('passed') else 'FAILED'}**", ""]
    if kind == "fuzz":
        lines += ["| figure | value |", "| --- | --- |"]
        lines += [f"| {k} | {data[k]} |" for k in ("tried", "malformed", "wrong_codes", "crashes", "message_problems",
                                                   "valid_sent", "valid_lost", "server_alive", "duration_s")]
        lines += [f"| rss before / after (MiB) | {data.get('rss_before_mb')} / {data.get('rss_after_mb')} |", "",
                  "| class | tried | wrong code | crashes | codes |", "| --- | --- | --- | --- | --- |"]
        for name, s in data["by_class"].items():
            lines.append(f"| {name} | {s['tried']} | {s['wrong_code']} | {s['crashes']} | {s['codes']} |")
        if data.get("examples"):
            lines += ["", "First failures:", ""] + [f"- {e}" for e in data["examples"]]
    else:
        checks = data.get("checks", {})
        lines += ["| check | ok |", "| --- | --- |"]
        lines += [f"| {k} | {'inconclusive (client-limited)' if v is None else v} |" for k, v in checks.items()]
        if data.get("client_limited"):
            lines += ["", f"The load generator ({data.get('workers')} worker processes) sent less than 90 % of the "
                      "offered rate (achieved_rps, CLIENT_OVERLOAD): latency checks are inconclusive; give it more "
                      "cores (--workers, or a second machine)."]
        if "headline" in data:
            lines += ["", "| figure | value |", "| --- | --- |"]
            lines += [f"| {k} | {v} |" for k, v in data["headline"].items()]
        lines.append("")
        for key in ("capacity_rps", "workers", "client_limited", "rate_rps", "offered_rps", "achieved_rps",
                    "overload", "recovery", "server_metrics", "rss_mb", "sent",
                    "valid_sent", "valid_failed", "invalid_sent", "invalid_wrong_code", "codes", "window_p99_ms",
                    "p99_halves_after_warmup_ms", "p99_second_over_first_half"):
            if key in data:
                lines.append(f"- **{key}**: {data[key]}")
    return "\n".join(lines) + "\n"
