"""Structured logs: one JSON object per line. Access lines carry no prompt text."""

from __future__ import annotations

import logging
import sys
import time

import msgspec

_encode = msgspec.json.Encoder().encode
logger = logging.getLogger("ferroserve")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if fields:
            entry.update(fields)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return _encode(entry).decode()


def setup(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    logger.handlers[:] = [handler]
    logger.setLevel(level.upper())
    logger.propagate = False


def access(method: str, path: str, status: int, started: float, request_id: str, **extra: object) -> None:
    if logger.isEnabledFor(logging.INFO):
        fields = {
            "request_id": request_id,
            "method": method,
            "path": path,
            "status": status,
            "ms": round((time.perf_counter() - started) * 1000, 3),
        }
        fields.update(extra)
        logger.info("request", extra={"fields": fields})
