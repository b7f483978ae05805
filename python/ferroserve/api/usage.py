"""`GET /v1/usage` (totals, records or groups by day/model) and `GET /v1/usage/export` (CSV).

Filters: `start`, `end` (YYYY-MM-DD, inclusive, UTC; or unix seconds), `model`, `group_by`
(`day` | `model`), `limit` (records, newest first; default 100, at most 10,000). A key sees
its own workspace; an admin key (or an open server) may pass `workspace=NAME` or `workspace=*`.
"""

from __future__ import annotations

import csv
import datetime as _dt
import io
import math
from urllib.parse import parse_qs

import msgspec

from ferroserve.errors import ApiError, invalid
from ferroserve.gateway.gate import Gateway, Ticket
from ferroserve.gateway.store import USAGE_COLUMNS

_encode = msgspec.json.Encoder().encode


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return _dt.datetime.fromtimestamp(ts, _dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# Unix seconds a UTC date can show: years 1 to 9999.
_MIN_TS = _dt.datetime(1, 1, 2, tzinfo=_dt.timezone.utc).timestamp()
_MAX_TS = _dt.datetime(9999, 12, 30, tzinfo=_dt.timezone.utc).timestamp()


def _time(params: dict, name: str, end_of_day: bool) -> float | None:
    values = params.get(name)
    if not values:
        return None
    text = values[-1]
    try:
        if len(text) == 10 and text[4] == "-":
            day = _dt.date.fromisoformat(text)
            ts = _dt.datetime(day.year, day.month, day.day, tzinfo=_dt.timezone.utc).timestamp()
            return ts + 86400 if end_of_day else ts
        ts = float(text)
    except ValueError:
        ts = math.nan
    # A finite moment a date can show (`inf`, `nan` and 1e20 parse as floats, and were a 500).
    if not _MIN_TS <= ts <= _MAX_TS:
        raise invalid(f"{name} must be a date (YYYY-MM-DD) or unix seconds, got {text!r}.", param=name)
    return ts


def _one(params: dict, name: str) -> str | None:
    values = params.get(name)
    return values[-1] if values else None


def _int(params: dict, name: str, default: int, most: int) -> int:
    text = _one(params, name)
    if text is None:
        return default
    # isascii: "²".isdigit() is true and int("²") fails (was a 500).
    if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= most:
        raise invalid(f"{name} must be an integer between 1 and {most}.", param=name)
    return int(text)


def workspace_scope(ticket: Ticket, params: dict) -> str | None:
    """The workspace a caller may read; None means every workspace (admins only)."""
    asked = _one(params, "workspace")
    privileged = ticket.key is None or ticket.key.admin
    if asked is None or asked == ticket.workspace:
        return ticket.workspace
    if not privileged:
        raise ApiError(403, "Only an admin key may read another workspace's usage.", param="workspace", code="permission_denied")
    return None if asked == "*" else asked


def filters(ticket: Ticket, query: str) -> tuple[dict, dict]:
    params = parse_qs(query or "", keep_blank_values=False)
    group_by = _one(params, "group_by")
    if group_by not in (None, "day", "model"):
        raise invalid("group_by must be day or model.", param="group_by")
    return params, {
        "workspace": workspace_scope(ticket, params),
        "start": _time(params, "start", False),
        "end": _time(params, "end", True),
        "model": _one(params, "model"),
        "group_by": group_by,
    }


def record_json(r: dict) -> dict:
    """One usage row in the IPOP spec's `UsageRecord` shape, plus our columns."""
    return {
        "request_id": r["request_id"],
        "created_at": iso(r["created_at"]),
        "model": r["model"],
        "route": r["route"],
        "key_id": r["key_id"],
        "workspace": r["workspace"],
        "backend": r["backend"],
        "cache_hit": bool(r["cache_hit"]),
        "fallbacks": r["fallbacks"].split("\n") if r["fallbacks"] else [],
        "status": r["status"],
        "tokens_in": r["prompt_tokens"],
        "tokens_out": r["completion_tokens"],
        "token_details": {"cached_input_tokens": r["cached_tokens"], "total_tokens": r["prompt_tokens"] + r["completion_tokens"]},
        "cost": r["cost_usd"],
        "provider_billed": False,
        "duration_ms": round(r["latency_ms"]),
        "latency_ms": r["latency_ms"],
    }


async def summary(gateway: Gateway, ticket: Ticket, query: str) -> bytes:
    params, f = filters(ticket, query)
    limit = _int(params, "limit", 100, 10_000)
    group_by = f.pop("group_by")

    def read(store):
        totals = store.usage_totals(**f)[0]
        groups = store.usage_totals(**f, group_by=group_by) if group_by else None
        rows = None if group_by else store.usage_rows(**f, limit=limit)
        return totals, groups, rows

    totals, groups, rows = await gateway.call(read)
    out = {
        "object": "usage",
        "workspace": f["workspace"] if f["workspace"] is not None else "*",
        "start": iso(f["start"]), "end": iso(f["end"]), "model": f["model"],
        "total_requests": totals[1], "total_tokens_in": totals[2], "total_tokens_out": totals[3],
        "total_cached_tokens": totals[4], "total_cost": totals[5],
    }
    if groups is not None:
        out["group_by"] = group_by
        out["groups"] = [{"key": g[0], "requests": g[1], "tokens_in": g[2], "tokens_out": g[3], "cached_tokens": g[4], "cost": g[5]} for g in groups]
        out["records"] = []
    else:
        out["records"] = [record_json(r) for r in rows]
    return _encode(out)


_CSV_COLUMNS = [c for c in USAGE_COLUMNS if c != "prompt"]


async def export_csv(gateway: Gateway, ticket: Ticket, query: str) -> bytes:
    params, f = filters(ticket, query)
    f.pop("group_by")
    rows = await gateway.call(lambda store: store.usage_rows(**f))
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(_CSV_COLUMNS)
    for r in reversed(rows):  # oldest first in a file
        writer.writerow([iso(r[c]) if c == "created_at" else r[c] for c in _CSV_COLUMNS])
    return buf.getvalue().encode()
