"""`GET /v1/request-history` and `GET /v1/request-history/{id}`: sanitised records of the
caller's workspace (no request text unless the workspace turned capture on)."""

from __future__ import annotations

from urllib.parse import parse_qs

import msgspec

from ferroserve.api.usage import _int, _one, iso, workspace_scope
from ferroserve.errors import ApiError
from ferroserve.gateway.gate import Gateway, Ticket

_encode = msgspec.json.Encoder().encode
_KIND = {"/v1/chat/completions": "chat", "/v1/completions": "completions", "/v1/embeddings": "embeddings"}


def history_json(r: dict) -> dict:
    done = r["created_at"]
    started = done - r["latency_ms"] / 1000
    out = {
        "request_id": r["request_id"],
        "model": r["model"],
        "execution_kind": _KIND.get(r["route"], r["route"]),
        "status": "completed" if r["status"] < 400 else "failed",
        "http_status": r["status"],
        "error": r["error_code"],
        "tokens_in": r["prompt_tokens"],
        "tokens_out": r["completion_tokens"],
        "token_details": {"cached_input_tokens": r["cached_tokens"], "total_tokens": r["prompt_tokens"] + r["completion_tokens"]},
        "cost": r["cost_usd"],
        "backend": r["backend"],
        "cache_hit": bool(r["cache_hit"]),
        "fallbacks": r["fallbacks"].split("\n") if r["fallbacks"] else [],
        "key_id": r["key_id"],
        "workspace": r["workspace"],
        "latency_ms": r["latency_ms"],
        "ttft_ms": r["ttft_ms"],
        "created_at": iso(started),
        "started_at": iso(started),
        "completed_at": iso(done),
        "updated_at": iso(done),
    }
    if r["prompt"] is not None:
        out["request_body"] = r["prompt"]
    return out


async def list_records(gateway: Gateway, ticket: Ticket, query: str) -> bytes:
    params = parse_qs(query or "")
    workspace = workspace_scope(ticket, params)
    limit = _int(params, "limit", 50, 1000)
    model = _one(params, "model")
    rows = await gateway.call(lambda s: s.usage_rows(workspace=workspace, start=None, end=None, model=model, limit=limit))
    return _encode({"object": "list", "data": [history_json(r) for r in rows]})


async def get_record(gateway: Gateway, ticket: Ticket, request_id: str) -> bytes:
    privileged = ticket.key is None or ticket.key.admin
    workspace = None if privileged else ticket.workspace
    rows = await gateway.call(
        lambda s: s.usage_rows(workspace=workspace, start=None, end=None, model=None, limit=1, request_id=request_id))
    if not rows:
        raise ApiError(404, f"No request {request_id!r} in this workspace's history.", param="request_id", code="not_found")
    return _encode(history_json(rows[0]))
