"""The batch runner: this process's share of the batch queue, run in the background.

A batch is claimed through its lease (jobs/leases.py) and run chunk by chunk: read the next
inputs from its input file (at the committed byte offset), run them through the same Router
and Backend path as any request (at batch priority; routing, fallback, budgets and usage
apply), append the results to the result files and fsync them, then commit the counts and
offsets in one small transaction. A process that dies mid-chunk loses only that chunk, which
whoever takes the batch over truncates away and runs again: every input's result is in the
output once, in input order.

Two kinds share the table and the loop: NUREV's `/v1/batch/embeddings` (vectors into one
float32 file, `dimensions` floats per input) and OpenAI's `/v1/batches` (JSONL output and
error files keyed by `custom_id`).
"""

from __future__ import annotations

import asyncio
import datetime
import os
import secrets
import time

import httpx
import msgspec
import numpy as np

from ferroserve.api import chat, completions, embeddings
from ferroserve.api.files import BatchLine
from ferroserve.backends.base import EmbedRequest
from ferroserve.config import Settings
from ferroserve.errors import ApiError
from ferroserve.gateway.gate import Gateway, Ticket
from ferroserve.gateway.router import Router
from ferroserve.jobs import signing, webhooks
from ferroserve.jobs.leases import Leases
from ferroserve.jobs.storage import Appender, DataFiles, LineReader, append
from ferroserve.log import logger

_encode = msgspec.json.Encoder().encode
_decode_line = msgspec.json.Decoder(BatchLine).decode
_decode_text = msgspec.json.Decoder(str).decode
# Rows of an OpenAI batch run at once per chunk (the engine batches them); 1 when the
# workspace has a budget, so admission sees every earlier row's cost and never overspends.
OPENAI_CHUNK_ROWS = 32
# A chunk the backends cannot serve now (503) is tried again this often before its rows fail.
UNAVAILABLE_RETRIES = 5

EMBEDDINGS, OPENAI = "embeddings", "openai"


class LeaseLost(Exception):
    """Another process owns the batch now (this one was too slow to beat, or it was deleted)."""


def new_request_id() -> str:
    return "batch_req_" + secrets.token_hex(12)


def _error_body(err: ApiError) -> dict:
    return msgspec.json.decode(err.body())


class BatchRunner:
    def __init__(self, router: Router, gateway: Gateway, settings: Settings) -> None:
        self.router = router
        self.gateway = gateway
        self.settings = settings
        self.files = DataFiles(settings.files_dir or settings.data_dir)
        # New batches and those of a process that died are claimed alike.
        self.leases = Leases(gateway, "batches", self._run, noun="batch", capacity=settings.batch_concurrency,
                             claimed="batch claimed")
        self._client: httpx.AsyncClient | None = None
        self._signing_key: str | None = None
        # One batch chunk in an engine at a time across this process's batches: batch work
        # fills the engine's gaps instead of queueing ahead of interactive requests.
        self._engine_turn = asyncio.Lock()

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._client = httpx.AsyncClient(timeout=httpx.Timeout(10.0), follow_redirects=False)
        self.leases.start(loop)

    def stop(self) -> None:
        self.leases.stop()

    async def signing_key(self) -> str:
        if self._signing_key is None:
            key = await self.gateway.call(lambda s: s.server_secret(signing.KEY_NAME))
            self._signing_key = key
        return self._signing_key

    # The lease's work -------------------------------------------------------------------------
    async def _run(self, row: dict) -> None:
        batch_id = row["id"]
        try:
            if row["status"] in ("validating", "in_progress"):
                row = await (self._embeddings(row) if row["kind"] == EMBEDDINGS else self._openai(row))
            elif row["status"] in ("finalizing", "cancelling"):
                row = await self._finish(row, {})
            if row is not None and row.get("webhook_state") == "pending":
                await self._webhook(row)
        except LeaseLost:
            logger.info("batch lease lost", extra={"fields": {"batch_id": batch_id}})
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("batch failed", extra={"fields": {"batch_id": batch_id}})
            owner = self.leases.owner
            errors = _encode({"object": "list", "data": [{"code": "server_error", "message": "The batch stopped on an internal error."}]}).decode()
            await self.gateway.call(lambda s: s.finish_batch(batch_id, owner, {"status": "failed", "failed_at": time.time(),
                                                                               "errors": errors}, []))

    async def _commit(self, batch_id: str, values: dict) -> str:
        owner = self.leases.owner
        status = await self.gateway.call(lambda s: s.batch_progress(batch_id, owner, values, time.time()))
        if status is None:
            raise LeaseLost(batch_id)
        return status

    async def _start(self, row: dict, progress: dict) -> str:
        """A claimed batch begins (or resumes): `in_progress` unless it was cancelled."""
        first = {**progress, "status": "in_progress", "in_progress_at": time.time()} if row["status"] == "validating" else progress
        return await self._commit(row["id"], first)

    def _ticket(self, row: dict, request_id: str) -> Ticket:
        key = self.gateway.key_by_id(row["key_id"]) if row["key_id"] else None
        return Ticket(self.gateway, request_id, time.perf_counter(), key, row["workspace"], None, False)

    # NUREV embeddings ---------------------------------------------------------------------------
    async def _embeddings(self, row: dict) -> dict | None:
        batch_id = row["id"]
        progress = {k: row[k] for k in ("completed", "failed", "total_tokens", "input_offset", "output_bytes", "dimensions")}
        status = await self._start(row, progress)
        reader = LineReader(self.files.path(row["input_path"]), row["input_offset"])
        out = Appender(self.files.path(DataFiles.batch(batch_id, "f32")), row["output_bytes"])
        budget_error: ApiError | None = None
        chunk = max(1, self.settings.batch_chunk_inputs)
        try:
            while status == "in_progress" and progress["completed"] + progress["failed"] < row["total"]:
                start = progress["completed"] + progress["failed"]
                texts = [_decode_text(line) for line in reader.read(chunk)]
                if not texts:
                    raise RuntimeError(f"batch {batch_id}: input ended at row {start} of {row['total']}")
                vectors, ok, tokens, records, budget_error = await self._embed_chunk(row, progress, texts, start, budget_error)
                size = await append(out, vectors.tobytes())
                progress.update(completed=progress["completed"] + int(ok.sum()), failed=progress["failed"] + int((~ok).sum()),
                                total_tokens=progress["total_tokens"] + tokens, input_offset=reader.offset, output_bytes=size)
                status = await self._commit(batch_id, progress)
                for record in records:  # metered once the rows are committed (a rerun chunk is not billed twice)
                    self.gateway.record(*record)
        finally:
            reader.close()
            out.close()
        values = {}
        if budget_error is not None:
            values["errors"] = _encode({"object": "list", "data": [_error_body(budget_error)["error"]]}).decode()
        return await self._finish({**row, **progress, "status": status}, values)

    async def _embed_chunk(self, row: dict, progress: dict, texts: list[str], start: int, budget_error: ApiError | None):
        """(float32 vectors, which rows succeeded, tokens, usage records to write, the budget error
        once the budget ran out). Failed rows are NaN."""
        n = len(texts)
        plan = self.router.plan(row["model"], "embeddings", None)
        ticket = self._ticket(row, f"{row['id']}-{start}")
        ticket.restrict(plan)
        first = plan.candidates[0]
        dim = progress["dimensions"] or first.dimensions
        vectors = np.full((n, dim or 0), np.nan, dtype=np.float32)
        ok = np.zeros(n, dtype=bool)
        if budget_error is not None:
            return vectors, ok, 0, [], budget_error
        take = n
        if ticket.needs_prompt_tokens(first):
            take, budget_error = self._affordable(ticket, first, texts)
        if take == 0:
            return vectors, ok, 0, [], budget_error
        request = EmbedRequest(texts=texts[:take], encoding="base64", priority=self.settings.batch_jobs_priority)
        result, model, error = None, None, None
        for attempt in range(UNAVAILABLE_RETRIES + 1):
            try:
                async with self._engine_turn:
                    model, result = await self.router.embed(plan, request)
                break
            except ApiError as err:
                error = err
                if err.status != 503 or attempt == UNAVAILABLE_RETRIES:
                    break
                await asyncio.sleep(min(30.0, 2.0 ** attempt))
                plan = self.router.plan(row["model"], "embeddings", None)
                ticket.restrict(plan)
        if result is None:
            assert error is not None
            if error.status == 400 and take > 1:  # one bad input: find it, keep the rest
                return await self._embed_singly(row, progress, texts, start, budget_error)
            logger.info("batch chunk failed", extra={"fields": {"batch_id": row["id"], "rows": take, "code": error.code}})
            return vectors, ok, 0, [], budget_error
        got = result.as_array()
        if vectors.shape[1] == 0:
            vectors = np.full((n, got.shape[1]), np.nan, dtype=np.float32)
        progress["dimensions"] = vectors.shape[1]
        vectors[:take] = got
        ok[:take] = True
        ticket.served(model, plan)
        fields = {"model": model.spec.name, "prompt_tokens": result.prompt_tokens, "backend": model.info.backend,
                  "batch_id": row["id"]}
        cost = self.gateway.settle(ticket, fields)
        record = (ticket, ticket.started, "/v1/batch/embeddings", 200, fields, cost, None, True)
        return vectors, ok, result.prompt_tokens, [record], budget_error

    async def _embed_singly(self, row, progress, texts, start, budget_error):
        parts = [await self._embed_chunk(row, progress, [t], start + i, budget_error) for i, t in enumerate(texts)]
        dim = max(p[0].shape[1] for p in parts)
        vectors = np.full((len(texts), dim), np.nan, dtype=np.float32)
        for i, p in enumerate(parts):
            if p[1][0]:
                vectors[i] = p[0][0]
        return (vectors, np.array([p[1][0] for p in parts]), sum(p[2] for p in parts), [r for p in parts for r in p[3]],
                next((p[4] for p in parts if p[4] is not None), budget_error))

    def _affordable(self, ticket: Ticket, model, texts: list[str]) -> tuple[int, ApiError | None]:
        """How many of `texts` the workspace's budget still pays for (all, or the longest
        prefix that fits, input by input), and the budget error if not all."""
        backend = model.backend
        try:
            ticket.admit(model, backend.count_embed_tokens(EmbedRequest(texts=texts)))
            return len(texts), None
        except ApiError as err:
            if err.code != "budget_exceeded":
                raise
            error = err
        take, tokens = 0, 0
        for text in texts:
            try:
                ticket.admit(model, tokens + backend.count_embed_tokens(EmbedRequest(texts=[text])))
            except ApiError:
                break
            tokens = ticket.charged_prompt_tokens
            take += 1
        if take:
            ticket.admit(model, tokens)
        return take, error

    # OpenAI batches ------------------------------------------------------------------------------
    async def _openai(self, row: dict) -> dict | None:
        batch_id = row["id"]
        progress = {k: row[k] for k in ("completed", "failed", "input_offset", "output_bytes", "error_bytes")}
        status = await self._start(row, progress)
        reader = LineReader(self.files.path(row["input_path"]), row["input_offset"])
        out = Appender(self.files.path(DataFiles.batch(batch_id, "out.jsonl")), row["output_bytes"])
        err = Appender(self.files.path(DataFiles.batch(batch_id, "err.jsonl")), row["error_bytes"])
        workspace_budget = self.gateway.budget_of(row["workspace"]) is not None
        rows_at_once = 1 if workspace_budget else OPENAI_CHUNK_ROWS
        budget_error: ApiError | None = None
        expired = False
        try:
            while status == "in_progress" and progress["completed"] + progress["failed"] < row["total"]:
                expired = row["expires_at"] is not None and time.time() >= row["expires_at"]
                # Rows failed without running go in big chunks.
                lines = reader.read(1024 if expired or budget_error is not None else rows_at_once)
                if not lines:
                    raise RuntimeError(f"batch {batch_id}: input ended before row {row['total']}")
                results = []
                for line in lines:
                    item = _decode_line(line)
                    if expired:
                        results.append(self._row_error(item, None, "batch_expired",
                                                       "This request could not be executed before the completion window expired."))
                    elif budget_error is not None:
                        results.append(self._row_error(item, budget_error))
                if not results:
                    results = await asyncio.gather(*(self._openai_row(row, _decode_line(line)) for line in lines))
                good = b"".join(r[1] for r in results if r[0])
                bad = b"".join(r[1] for r in results if not r[0])
                for r in results:
                    if r[2] is not None and r[2].code == "budget_exceeded":
                        budget_error = r[2]
                progress.update(completed=progress["completed"] + sum(1 for r in results if r[0]),
                                failed=progress["failed"] + sum(1 for r in results if not r[0]),
                                input_offset=reader.offset,
                                output_bytes=await append(out, good), error_bytes=await append(err, bad))
                status = await self._commit(batch_id, progress)
                for r in results:
                    if r[3] is not None:
                        self.gateway.record(*r[3])
        finally:
            reader.close()
            out.close()
            err.close()
        values = {"status": "expired"} if expired and status == "in_progress" else {}
        return await self._finish({**row, **progress, "status": status}, values)

    def _row_error(self, item: BatchLine, err: ApiError | None, code: str | None = None, message: str | None = None):
        request_id = new_request_id()
        if err is not None:
            line = {"id": request_id, "custom_id": item.custom_id,
                    "response": {"status_code": err.status, "request_id": request_id, "body": _error_body(err)}, "error": None}
        else:
            line = {"id": request_id, "custom_id": item.custom_id, "response": None, "error": {"code": code, "message": message}}
        return False, _encode(line) + b"\n", err, None

    async def _openai_row(self, row: dict, item: BatchLine):
        """(succeeded, its output or error line, the ApiError if any, its usage record)."""
        request_id = new_request_id()
        ticket = self._ticket(row, request_id)
        endpoint = row["endpoint"]
        body = dict(item.body)
        body.pop("stream", None)  # a batch row is answered whole
        body.pop("stream_options", None)
        raw = _encode(body)
        fields: dict = {}
        error: ApiError | None = None
        status = 200
        try:
            if endpoint == "/v1/chat/completions":
                status, out, fields = await chat.create_chat_completion(self.router, raw, None, ticket,
                                                                        priority=self.settings.batch_jobs_priority)
            elif endpoint == "/v1/completions":
                status, out, fields = await completions.create_completion(self.router, raw, None, ticket,
                                                                          priority=self.settings.batch_jobs_priority)
            else:
                out, fields, _ = await embeddings.create_embedding(self.router, raw, self.settings.max_inputs, ticket, None,
                                                                   priority=self.settings.batch_jobs_priority)
        except ApiError as exc:
            error, status = exc, exc.status
        except Exception:
            logger.exception("batch row failed", extra={"fields": {"batch_id": row["id"], "request_id": request_id}})
            error = ApiError(500, "The server had an error while processing this request.", type="server_error")
            status = 500
        cost = self.gateway.settle(ticket, fields)
        fields = {**fields, "batch_id": row["id"]}
        record = (ticket, ticket.started, endpoint, status, fields, cost, error.code if error else None, True)
        if error is not None:
            line = {"id": request_id, "custom_id": item.custom_id,
                    "response": {"status_code": status, "request_id": request_id, "body": _error_body(error)}, "error": None}
            return False, _encode(line) + b"\n", error, record
        line = {"id": request_id, "custom_id": item.custom_id,
                "response": {"status_code": 200, "request_id": request_id, "body": msgspec.Raw(out)}, "error": None}
        return True, _encode(line) + b"\n", None, record

    # Endings -------------------------------------------------------------------------------------
    async def _finish(self, row: dict, values: dict) -> dict | None:
        """The final state from where the run stopped: cancelled (asked to), expired, failed
        (nothing succeeded, NUREV) or completed; result files published; webhook queued."""
        batch_id, now, status = row["id"], time.time(), row["status"]
        if status == "cancelling":
            final = "cancelled"
        elif values.get("status") == "expired":
            final = "expired"
        elif row["kind"] == EMBEDDINGS and row["completed"] == 0:
            final = "failed"
        else:
            final = "completed"
        values = {**values, "status": final, f"{final}_at": now}
        files = []
        if row["kind"] == OPENAI:
            values["finalizing_at"] = row.get("finalizing_at") or now
            for column, purpose, suffix, size in (("output_file_id", "batch_output", "out.jsonl", row["output_bytes"]),
                                                  ("error_file_id", "batch_error", "err.jsonl", row["error_bytes"])):
                if size:
                    file_id = "file-" + secrets.token_hex(12)
                    values[column] = file_id
                    name = f"{batch_id}_{'output' if purpose == 'batch_output' else 'error'}.jsonl"
                    files.append({"id": file_id, "workspace": row["workspace"], "purpose": purpose, "filename": name,
                                  "bytes": size, "created_at": now, "path": DataFiles.batch(batch_id, suffix)})
        if row.get("webhook_url") and final in ("completed", "failed", "cancelled"):
            values["webhook_state"] = "pending"
        owner = self.leases.owner
        if not await self.gateway.call(lambda s: s.finish_batch(batch_id, owner, values, files)):
            raise LeaseLost(batch_id)
        logger.info("batch finished", extra={"fields": {"batch_id": batch_id, "status": final, "completed": row["completed"],
                                                         "failed": row["failed"]}})
        return {**row, **values, "webhook_attempts": row.get("webhook_attempts") or 0, "webhook_next_at": None}

    async def _webhook(self, row: dict) -> None:
        totals = {"total_jobs": row["total"], "completed_jobs": row["completed"], "failed_jobs": row["failed"],
                  "total_tokens": row["total_tokens"]}
        status = row["status"]
        results = None
        if status == "completed" and self.settings.public_url:
            # No request here to take a Host header from: only a configured address will do.
            url, expires = signing.results_url(await self.signing_key(), self.settings.public_url, row["id"], time.time())
            expires_at = datetime.datetime.fromtimestamp(expires, datetime.timezone.utc).isoformat(timespec="seconds")
            results = {"url": url, "expires_at": expires_at.replace("+00:00", "Z")}
        body = webhooks.payload(row["id"], status, totals, results)
        assert self._client is not None
        await webhooks.deliver(self.gateway, self._client, row, self.leases.owner, body, f"batch.{status}",
                               self.settings.webhook_retry_base_s)


def link_or_copy(source: os.PathLike, target: os.PathLike) -> None:
    """The batch's own name for its input bytes: deleting the uploaded file leaves them."""
    try:
        os.link(source, target)
    except OSError:
        import shutil

        shutil.copyfile(source, target)
