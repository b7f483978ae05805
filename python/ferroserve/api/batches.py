"""OpenAI's `/v1/batches`: create from an uploaded `batch` file, list (paginated), retrieve,
cancel. Rows run in the background (jobs/runner.py); output and error files are JSONL keyed
by `custom_id`, in input order."""

from __future__ import annotations

import asyncio
import re
import secrets
import time
from typing import Any

import msgspec

from ferroserve.api.files import BATCH_ENDPOINTS, load as load_file, page, page_args
from ferroserve.errors import ApiError, from_validation, invalid
from ferroserve.gateway.gate import Gateway, Ticket
from ferroserve.jobs.runner import OPENAI, BatchRunner, link_or_copy
from ferroserve.jobs.storage import DataFiles

_encode = msgspec.json.Encoder().encode
# IPOP's names for the endpoints, accepted too.
_ENDPOINT_ALIASES = {"chat_completions": "/v1/chat/completions", "embeddings": "/v1/embeddings", "completions": "/v1/completions"}
_WINDOW = re.compile(r"^(\d+)([smhd])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}
MAX_WINDOW_S = 7 * 86400


class CreateBatch(msgspec.Struct):
    input_file_id: str
    endpoint: str
    completion_window: str = "24h"
    metadata: dict[str, Any] | None = None


_decode_create = msgspec.json.Decoder(CreateBatch).decode


def _window_s(text: str) -> int:
    m = _WINDOW.match(text)
    seconds = int(m.group(1)) * _UNIT_S[m.group(2)] if m else 0
    if not 1 <= seconds <= MAX_WINDOW_S:
        raise invalid("'completion_window' must be a duration such as '24h' (at most 7d).", param="completion_window")
    return seconds


def _metadata(value: dict[str, Any] | None) -> dict[str, str] | None:
    if value is None:
        return None
    if len(value) > 16 or not all(isinstance(k, str) and len(k) <= 64 and isinstance(v, str) and len(v) <= 512
                                  for k, v in value.items()):
        raise invalid("'metadata' holds at most 16 string pairs (keys up to 64, values up to 512 characters).",
                      param="metadata")
    return value


def _t(value: float | None) -> int | None:
    return int(value) if value is not None else None


def batch_json(row: dict) -> dict:
    errors = msgspec.json.decode(row["errors"]) if row["errors"] else None
    return {
        "id": row["id"], "object": "batch", "endpoint": row["endpoint"], "errors": errors,
        "input_file_id": row["input_file_id"], "completion_window": row["completion_window"], "status": row["status"],
        "output_file_id": row["output_file_id"], "error_file_id": row["error_file_id"], "created_at": int(row["created_at"]),
        **{k: _t(row[k]) for k in ("in_progress_at", "expires_at", "finalizing_at", "completed_at", "failed_at", "expired_at",
                                   "cancelling_at", "cancelled_at")},
        "request_counts": {"total": row["total"], "completed": row["completed"], "failed": row["failed"]},
        "metadata": msgspec.json.decode(row["metadata"]) if row["metadata"] else None,
    }


def _not_found(batch_id: str) -> ApiError:
    return ApiError(404, f"No batch with id '{batch_id}' in this workspace.", param="batch_id", code="not_found")


async def create(gateway: Gateway, runner: BatchRunner, body: bytes, ticket: Ticket) -> bytes:
    try:
        req = _decode_create(body)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise from_validation(exc) from None
    endpoint = _ENDPOINT_ALIASES.get(req.endpoint, req.endpoint)
    if endpoint not in BATCH_ENDPOINTS:
        raise invalid(f"'endpoint' must be one of {', '.join(BATCH_ENDPOINTS)}.", param="endpoint")
    window_s = _window_s(req.completion_window)
    metadata = _metadata(req.metadata)
    source = await load_file(gateway, ticket, req.input_file_id)
    if source["purpose"] != "batch":
        raise invalid(f"The file '{source['id']}' has purpose '{source['purpose']}'; a batch needs purpose 'batch'.",
                      param="input_file_id")
    if source["endpoint"] != endpoint:
        raise invalid(f"The file's requests are for {source['endpoint']}, not {endpoint}.", param="endpoint")
    batch_id = "batch_" + secrets.token_hex(12)
    relative = DataFiles.batch(batch_id, "in.jsonl")
    files = runner.files
    await asyncio.get_running_loop().run_in_executor(None, link_or_copy, files.path(source["path"]), files.path(relative))
    now = time.time()
    row = {"id": batch_id, "workspace": ticket.workspace or "", "kind": OPENAI, "status": "validating",
           "endpoint": endpoint, "input_path": relative, "input_file_id": source["id"], "completion_window": req.completion_window,
           "metadata": _encode(metadata).decode() if metadata is not None else None, "total": source["lines"],
           "created_at": now, "expires_at": now + window_s, "key_id": ticket.key.id if ticket.key is not None else None}
    await gateway.call(lambda s: s.insert_batch(row))
    runner.leases.poke()
    stored = await gateway.call(lambda s: s.get_batch(batch_id, row["workspace"], OPENAI))
    return _encode(batch_json(stored))


async def list_batches(gateway: Gateway, ticket: Ticket, query: str) -> bytes:
    _, limit, after = page_args(query, 20, 100)
    workspace = ticket.workspace or ""
    rows = await gateway.call(lambda s: s.list_batches(workspace, OPENAI, limit + 1, after))
    return page([batch_json(r) for r in rows], limit)


async def get(gateway: Gateway, ticket: Ticket, batch_id: str) -> bytes:
    workspace = ticket.workspace or ""
    row = await gateway.call(lambda s: s.get_batch(batch_id, workspace, OPENAI))
    if row is None:
        raise _not_found(batch_id)
    return _encode(batch_json(row))


async def cancel(gateway: Gateway, ticket: Ticket, arg: str) -> bytes:
    batch_id, _, action = arg.partition("/")
    if action != "cancel":
        raise ApiError(404, f"Unknown route POST /v1/batches/{arg}.", code="not_found")
    workspace = ticket.workspace or ""
    row = await gateway.call(lambda s: s.cancel_batch(batch_id, workspace, OPENAI, time.time()))
    if row is None:
        raise _not_found(batch_id)
    return _encode(batch_json(row))
