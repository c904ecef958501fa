"""Reliability harness: fuzz both gRPC APIs with malformed input, drive overload and soak, and report.

    python -m benchmarks.robustness fuzz     --model-repository DIR --model NAME --requests 10000
    python -m benchmarks.robustness overload --model-repository DIR --model NAME --duration 60
    python -m benchmarks.robustness soak     --model-repository DIR --model NAME --duration 600

Each command starts `mmkd-serve` as a child process (so its resident memory can be read from /proc and a crash
shows as a dead process), writes a JSON result and a markdown report, and exits 1 when an acceptance check fails.
"""
