"""NUREV's `/v1/batch/embeddings`: submit, status, cancel (DELETE), results behind a signed
URL (JSONL or `.npy`, streamed from the batch's float32 file), webhook deliveries."""

from __future__ import annotations

import asyncio
import datetime as _dt
import io
import time
import uuid
from urllib.parse import parse_qs, urlsplit

import msgspec
import numpy as np

from ferroserve.errors import ApiError, from_validation, invalid
from ferroserve.gateway.gate import Gateway, Ticket
from ferroserve.gateway.router import Router
from ferroserve.jobs import signing
from ferroserve.jobs.runner import EMBEDDINGS, BatchRunner
from ferroserve.jobs.storage import DataFiles, read_blocks, write_durably

MAX_INPUTS = 100_000
RESULTS_PREFIX = signing.RESULTS_PREFIX
_encode = msgspec.json.Encoder().encode
# NUREV's statuses for ours (OpenAI's words, shared with /v1/batches).
_STATUS = {"validating": "pending", "in_progress": "processing", "finalizing": "processing", "completed": "completed",
           "failed": "failed", "expired": "failed", "cancelling": "cancelled", "cancelled": "cancelled"}
_ROWS_PER_BLOCK = 1024


class BatchEmbeddingsRequest(msgspec.Struct):
    model: str
    inputs: list[str]
    webhook_url: str | None = None


_decode_request = msgspec.json.Decoder(BatchEmbeddingsRequest).decode


def _iso(t: float | None) -> str | None:
    if t is None:
        return None
    return _dt.datetime.fromtimestamp(t, _dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def batch_json(row: dict) -> dict:
    ended = row["completed_at"] or row["failed_at"] or row["cancelled_at"]
    return {"id": row["id"], "object": "batch", "status": _STATUS[row["status"]], "model": row["model"],
            "total_jobs": row["total"], "completed_jobs": row["completed"], "failed_jobs": row["failed"],
            "total_tokens": row["total_tokens"], "created_at": _iso(row["created_at"]), "completed_at": _iso(ended)}


def _not_found(batch_id: str) -> ApiError:
    return ApiError(404, f"No batch with id '{batch_id}' in this workspace.", param="id", code="not_found")


async def create(router: Router, gateway: Gateway, runner: BatchRunner, body: bytes, ticket: Ticket) -> bytes:
    try:
        req = _decode_request(body)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise from_validation(exc) from None
    if not 1 <= len(req.inputs) <= MAX_INPUTS:
        raise invalid(f"'inputs' must hold 1 to {MAX_INPUTS} strings; it has {len(req.inputs)}.", param="inputs")
    if not all(req.inputs):
        raise invalid("'inputs' must not contain empty strings.", param="inputs")
    if req.webhook_url is not None:
        parts = urlsplit(req.webhook_url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise invalid("'webhook_url' must be an http or https URL.", param="webhook_url")
    router.require(req.model, "embeddings")
    plan = router.plan(req.model, "embeddings", None)
    ticket.restrict(plan)
    batch_id = str(uuid.uuid4())
    relative = DataFiles.batch(batch_id, "in.jsonl")
    data = b"\n".join(map(_encode, req.inputs)) + b"\n"
    await asyncio.get_running_loop().run_in_executor(None, write_durably, runner.files.path(relative), data)
    now = time.time()
    row = {"id": batch_id, "workspace": ticket.workspace or "", "kind": EMBEDDINGS, "status": "validating",
           "endpoint": "/v1/embeddings", "model": req.model, "input_path": relative, "webhook_url": req.webhook_url,
           "dimensions": plan.candidates[0].dimensions, "total": len(req.inputs), "created_at": now,
           "key_id": ticket.key.id if ticket.key is not None else None}
    await gateway.call(lambda s: s.insert_batch(row))
    runner.leases.poke()
    return _encode(batch_json({**row, "completed": 0, "failed": 0, "total_tokens": 0, "completed_at": None,
                               "failed_at": None, "cancelled_at": None}))


async def _load(gateway: Gateway, ticket: Ticket, batch_id: str) -> dict:
    workspace = ticket.workspace or ""
    row = await gateway.call(lambda s: s.get_batch(batch_id, workspace, EMBEDDINGS))
    if row is None:
        raise _not_found(batch_id)
    return row


async def get(gateway: Gateway, runner: BatchRunner, scope, ticket: Ticket, arg: str) -> bytes:
    """`{id}`, `{id}/results` or `{id}/webhook-deliveries`."""
    batch_id, _, rest = arg.partition("/")
    row = await _load(gateway, ticket, batch_id)
    if rest == "":
        return _encode(batch_json(row))
    if rest == "results":
        if row["status"] != "completed":
            raise ApiError(404, f"The batch '{batch_id}' is {_STATUS[row['status']]}; results exist once it is completed.",
                           param="id", code="results_not_ready")
        url, expires = signing.results_url(await runner.signing_key(), base_url(runner, scope), batch_id, time.time())
        return _encode({"url": url, "expires_at": _iso(expires)})
    if rest == "webhook-deliveries":
        rows = await gateway.call(lambda s: s.webhook_deliveries(batch_id))
        data = [{"id": f"whd_{r['id']}", "object": "webhook_delivery", "attempt": r["attempt"], "event": r["event"],
                 "url": r["url"], "status_code": r["status_code"], "error": r["error"], "delivered": bool(r["delivered"]),
                 "duration_ms": r["duration_ms"], "created_at": _iso(r["created_at"])} for r in rows]
        return _encode({"object": "list", "data": data})
    raise ApiError(404, f"Unknown route GET /v1/batch/{arg}.", code="not_found")


def base_url(runner: BatchRunner, scope) -> str:
    """This server as the client reached it: `--public-url` when set (behind a proxy the Host
    header may name an internal address), else the request's Host header."""
    if runner.settings.public_url:
        return runner.settings.public_url
    host = scope.headers.get("host") or f"{runner.settings.host}:{runner.settings.port}"
    scheme = getattr(scope, "scheme", None) or "http"
    return f"{scheme}://{host}"


async def cancel(gateway: Gateway, ticket: Ticket, batch_id: str) -> bytes:
    workspace = ticket.workspace or ""
    row = await gateway.call(lambda s: s.cancel_batch(batch_id, workspace, EMBEDDINGS, time.time()))
    if row is None:
        raise _not_found(batch_id)
    return _encode(batch_json(row))


async def download(gateway: Gateway, runner: BatchRunner, scope, proto, batch_id: str) -> None:
    """The signed results URL: the vectors in input order, JSONL (a failed input's embedding
    is null) or `?format=npy` (float32, NaN rows for failed inputs). No bearer token."""
    params = {k: v[-1] for k, v in parse_qs(scope.query_string).items()}
    signing.check(await runner.signing_key(), RESULTS_PREFIX + batch_id, params)
    fmt = params.get("format", "jsonl")
    if fmt not in ("jsonl", "npy"):
        raise invalid("'format' must be 'jsonl' or 'npy'.", param="format")
    row = await gateway.call(lambda s: s.get_batch(batch_id, None, EMBEDDINGS))
    if row is None or row["status"] != "completed":
        raise _not_found(batch_id)
    dim, total = row["dimensions"], row["total"]
    path = runner.files.path(DataFiles.batch(batch_id, "f32"))
    if fmt == "npy":
        header = io.BytesIO()
        np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": (total, dim)})
        head = header.getvalue()
        transport = proto.response_stream(200, [("content-type", "application/octet-stream"),
                                                ("content-length", str(len(head) + row["output_bytes"])),
                                                ("content-disposition", f'attachment; filename="{batch_id}.npy"')])
        await transport.send_bytes(head)
        async for block in read_blocks(path, 0, row["output_bytes"]):
            await transport.send_bytes(block)
        return
    transport = proto.response_stream(200, [("content-type", "application/x-ndjson")])
    index = 0
    async for block in read_blocks(path, 0, row["output_bytes"], block=_ROWS_PER_BLOCK * dim * 4):
        vectors = np.frombuffer(block, dtype="<f4").reshape(-1, dim)
        failed = np.isnan(vectors[:, 0])
        lines = []
        for row_values, bad in zip(vectors.tolist(), failed.tolist()):
            lines.append(b'{"index":%d,"embedding":%s}\n' % (index, b"null" if bad else _encode(row_values)))
            index += 1
        await transport.send_bytes(b"".join(lines))
