"""Structured logs: one JSON object per line on stderr (`--log-format text` for humans).

Call sites log an event name and fields: `log.info("model_loaded", extra={"fields": {"model": "tiny"}})`.
"""

from __future__ import annotations

import json
import logging
import sys
import time


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {"ts": round(time.time(), 3), "level": record.levelname.lower(), "logger": record.name,
                 "event": record.getMessage(), **getattr(record, "fields", {})}
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = " ".join(f"{k}={v}" for k, v in getattr(record, "fields", {}).items())
        text = f"{self.formatTime(record)} {record.levelname:<7} {record.getMessage()} {fields}".rstrip()
        return text + ("\n" + self.formatException(record.exc_info) if record.exc_info else "")


def setup_logging(fmt: str = "json", level: int = logging.INFO) -> None:
    """Route the `mmkd` loggers to stderr in the chosen format (idempotent)."""
    logger = logging.getLogger("mmkd")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    logger.handlers[:] = [handler]
    logger.setLevel(level)
    logger.propagate = False


def fields(**values: object) -> dict[str, dict[str, object]]:
    """`extra=` helper: log.info("event", extra=fields(model="tiny"))."""
    return {"fields": values}
