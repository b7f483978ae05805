"""Structured logs: one JSON object per line. Access lines carry no prompt text."""

from __future__ import annotations

import asyncio
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


class _AccessLog:
    """Access lines, one JSON object per request in the `JsonFormatter` shape, written without
    the logging machinery on the request path: a line is encoded and queued, and the queue is
    written to stderr once per event-loop turn (under load many requests share one write; at
    low rates a line is out within the same turn). ≈ 2 µs a request instead of ≈ 15."""

    def __init__(self) -> None:
        self._lines: list[bytes] = []
        self._scheduled = False

    def write(self, fields: dict) -> None:
        self._lines.append(_encode(fields) + b"\n")
        if not self._scheduled:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self.flush()
                return
            self._scheduled = True
            loop.call_soon(self.flush)

    def flush(self) -> None:
        self._scheduled = False
        if not self._lines:
            return
        data = b"".join(self._lines)
        self._lines.clear()
        stream = sys.stderr
        try:
            stream.buffer.write(data)
            stream.flush()
        except (AttributeError, ValueError, OSError):
            pass


_access_log = _AccessLog()


def access(method: str, path: str, status: int, started: float, request_id: str, **extra: object) -> None:
    if logger.isEnabledFor(logging.INFO):
        now = time.time()
        fields = {
            "ts": round(now, 3),
            "level": "info",
            "msg": "request",
            "request_id": request_id,
            "method": method,
            "path": path,
            "status": status,
            "ms": round((time.perf_counter() - started) * 1000, 3),
        }
        fields.update(extra)
        _access_log.write(fields)


def flush_access() -> None:
    """Writes the access lines still queued (at shutdown, when no loop turn will)."""
    _access_log.flush()
