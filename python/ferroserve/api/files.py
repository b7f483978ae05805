"""`/v1/files`: upload (OpenAI's multipart form, or the raw body with `?purpose=`), list,
retrieve, download and delete. Bytes go to the data dir as they arrive (never held whole);
a `batch` file is checked line by line on the way, and refused with every bad line's number."""

from __future__ import annotations

import os
import secrets
import time
from urllib.parse import parse_qs

import msgspec
from python_multipart.multipart import MultipartParser, parse_options_header

from ferroserve.errors import ApiError, invalid
from ferroserve.gateway.gate import Gateway, Ticket
from ferroserve.jobs.storage import DataFiles, fsync_dir, read_blocks

_encode = msgspec.json.Encoder().encode
PURPOSES = ("batch", "batch_output", "batch_error", "assistants", "fine-tune", "vision", "user_data", "evals")
UPLOAD_PURPOSES = ("batch", "assistants", "fine-tune", "vision", "user_data", "evals")
BATCH_ENDPOINTS = ("/v1/chat/completions", "/v1/embeddings", "/v1/completions")
MAX_BATCH_LINES = 50_000
_MAX_LISTED_ERRORS = 20


class BatchLine(msgspec.Struct):
    custom_id: str
    method: str
    url: str
    body: dict


_decode_line = msgspec.json.Decoder(BatchLine).decode


class BatchLineCheck:
    """Splits the upload into lines as it arrives and checks each as a batch request; keeps
    the first `_MAX_LISTED_ERRORS` errors with their line numbers."""

    def __init__(self) -> None:
        self.partial = b""
        self.line_number = 0
        self.requests = 0
        self.errors: list[str] = []
        self.error_count = 0
        self.custom_ids: set[str] = set()
        self.endpoint: str | None = None

    def feed(self, data: bytes) -> None:
        lines = (self.partial + data).split(b"\n")
        self.partial = lines.pop()
        for line in lines:
            self._line(line)

    def finish(self) -> None:
        if self.partial:
            self._line(self.partial)
            self.partial = b""

    def _fail(self, message: str) -> None:
        self.error_count += 1
        if len(self.errors) < _MAX_LISTED_ERRORS:
            self.errors.append(f"line {self.line_number}: {message}")

    def _line(self, line: bytes) -> None:
        self.line_number += 1
        if not line.strip():
            return
        try:
            item = _decode_line(line)
        except msgspec.ValidationError as exc:
            return self._fail(str(exc))
        except msgspec.DecodeError as exc:
            return self._fail(f"not valid JSON ({exc})")
        self.requests += 1
        if not item.custom_id:
            return self._fail("custom_id must not be empty")
        if item.custom_id in self.custom_ids:
            return self._fail(f"custom_id {item.custom_id!r} is used twice")
        self.custom_ids.add(item.custom_id)
        if item.method.upper() != "POST":
            return self._fail(f"method must be POST, got {item.method!r}")
        if item.url not in BATCH_ENDPOINTS:
            return self._fail(f"url must be one of {', '.join(BATCH_ENDPOINTS)}, got {item.url!r}")
        if self.endpoint is None:
            self.endpoint = item.url
        elif item.url != self.endpoint:
            return self._fail(f"url {item.url!r} differs from the first request's {self.endpoint!r} (one endpoint per batch)")
        if not isinstance(item.body.get("model"), str):
            return self._fail("body.model must be a string")

    def error(self) -> ApiError | None:
        if self.requests > MAX_BATCH_LINES:
            return invalid(f"A batch file holds at most {MAX_BATCH_LINES} requests; this one has {self.requests}.",
                           param="file", code="invalid_file")
        if self.error_count:
            more = f" (and {self.error_count - len(self.errors)} more)" if self.error_count > len(self.errors) else ""
            return invalid(f"The file is not valid batch JSONL: {'; '.join(self.errors)}{more}.", param="file",
                           code="invalid_file")
        if self.requests == 0:
            return invalid("The file holds no requests.", param="file", code="invalid_file")
        return None


def file_json(row: dict) -> dict:
    return {"id": row["id"], "object": "file", "bytes": row["bytes"], "created_at": int(row["created_at"]),
            "filename": row["filename"], "purpose": row["purpose"], "status": "processed", "expires_at": None,
            "status_details": None}


def new_file_id() -> str:
    return "file-" + secrets.token_hex(12)


class _Upload:
    """The form as it streams in: small fields in memory, the `file` part to disk."""

    def __init__(self, path, limit: int) -> None:
        self.path = path
        self.limit = limit
        self.out = None
        self.size = 0
        self.fields: dict[str, bytes] = {}
        self.filename: str | None = None
        self.check = BatchLineCheck()
        self._header_field = b""
        self._header_value = b""
        self._headers: dict[bytes, bytes] = {}
        self._name: str | None = None
        self._is_file = False
        self.files_seen = 0

    def callbacks(self) -> dict:
        return {
            "on_part_begin": self._part_begin, "on_header_field": self._header_field_data,
            "on_header_value": self._header_value_data, "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished, "on_part_data": self._part_data, "on_part_end": self._part_end,
        }

    def _part_begin(self) -> None:
        self._headers, self._name, self._is_file = {}, None, False

    def _header_field_data(self, data: bytes, start: int, end: int) -> None:
        self._header_field += data[start:end]

    def _header_value_data(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _header_end(self) -> None:
        self._headers[self._header_field.lower()] = self._header_value
        self._header_field, self._header_value = b"", b""

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        self._name = options.get(b"name", b"").decode("utf-8", "replace")
        filename = options.get(b"filename")
        self._is_file = self._name == "file"
        if self._is_file:
            self.files_seen += 1
            self.filename = (filename or b"file").decode("utf-8", "replace")
            self.out = open(self.path, "wb")
        else:
            self.fields[self._name] = b""

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._is_file:
            self.write(data[start:end])
        elif self._name is not None:
            value = self.fields[self._name] + data[start:end]
            if len(value) > 4096:
                raise invalid(f"The form field {self._name!r} is too long.", param=self._name)
            self.fields[self._name] = value

    def _part_end(self) -> None:
        self._is_file = False

    def write(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self.limit:
            raise ApiError(413, f"The file exceeds the limit of {self.limit} bytes.", param="file", code="file_too_large")
        self.check.feed(data)
        self.out.write(data)


async def upload(gateway: Gateway, files: DataFiles, limit: int, scope, proto, ticket: Ticket) -> bytes:
    declared = scope.headers.get("content-length")
    # The form's own bytes (boundaries, the purpose field) ride on top of the file's.
    if declared is not None and declared.isdigit() and int(declared) > limit + 64 * 1024:
        raise ApiError(413, f"The upload of {declared} bytes exceeds the file limit of {limit} bytes.", param="file",
                       code="file_too_large")
    query = parse_qs(scope.query_string)
    content_type = scope.headers.get("content-type") or ""
    kind, options = parse_options_header(content_type)
    file_id = new_file_id()
    relative = files.upload(file_id)
    path = files.path(relative)
    up = _Upload(path, limit)
    kept = False
    try:
        if kind == b"multipart/form-data":
            boundary = options.get(b"boundary")
            if not boundary:
                raise invalid("The multipart body has no boundary.", param="file")
            parser = MultipartParser(boundary, up.callbacks())
            async for chunk in proto:
                parser.write(chunk)
            parser.finalize()
            if up.files_seen != 1:
                raise invalid("The form must have exactly one `file` part.", param="file")
            purpose = up.fields.get("purpose", b"").decode("utf-8", "replace")
        else:  # IPOP's shape: the body is the file; purpose and filename in the query
            up.out = open(path, "wb")
            up.filename = (query.get("filename") or ["file"])[0]
            async for chunk in proto:
                up.write(chunk)
            purpose = (query.get("purpose") or [""])[0]
        up.check.finish()
        if not purpose:
            raise invalid("'purpose' is required.", param="purpose")
        if purpose not in UPLOAD_PURPOSES:
            raise invalid(f"'purpose' must be one of {', '.join(UPLOAD_PURPOSES)}.", param="purpose")
        if purpose == "batch" and (err := up.check.error()) is not None:
            raise err
        out = up.out
        out.flush()
        os.fsync(out.fileno())
        out.close()
        fsync_dir(path.parent)
        row = {"id": file_id, "workspace": ticket.workspace or "", "purpose": purpose, "filename": up.filename or "file",
               "bytes": up.size, "created_at": time.time(), "path": relative,
               "lines": up.check.requests if purpose == "batch" else None,
               "endpoint": up.check.endpoint if purpose == "batch" else None}
        await gateway.call(lambda s: s.insert_file(row))
        kept = True
        return _encode(file_json(row))
    except ValueError as exc:  # the multipart parser's complaints (python_multipart errors derive from it)
        raise invalid(f"The multipart body could not be parsed: {exc}", param="file") from None
    finally:
        if up.out is not None and not up.out.closed:
            up.out.close()
        if not kept:
            files.remove(relative)


def _not_found(file_id: str) -> ApiError:
    return ApiError(404, f"No file with id '{file_id}' in this workspace.", param="file_id", code="not_found")


async def load(gateway: Gateway, ticket: Ticket, file_id: str) -> dict:
    workspace = ticket.workspace or ""
    row = await gateway.call(lambda s: s.get_file(file_id, workspace))
    if row is None:
        raise _not_found(file_id)
    return row


def page_args(query: str, default_limit: int, max_limit: int) -> tuple[dict, int, str | None]:
    params = {k: v[-1] for k, v in parse_qs(query).items()}
    try:
        limit = int(params.get("limit", default_limit))
    except ValueError:
        raise invalid("'limit' must be an integer.", param="limit") from None
    if not 1 <= limit <= max_limit:
        raise invalid(f"'limit' must be between 1 and {max_limit}.", param="limit")
    return params, limit, params.get("after")


def page(data: list[dict], limit: int) -> bytes:
    more = len(data) > limit
    data = data[:limit]
    return _encode({"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
                    "last_id": data[-1]["id"] if data else None, "has_more": more})


async def list_files(gateway: Gateway, ticket: Ticket, query: str) -> bytes:
    params, limit, after = page_args(query, 10_000, 10_000)
    order = params.get("order", "desc")
    if order not in ("asc", "desc"):
        raise invalid("'order' must be 'asc' or 'desc'.", param="order")
    workspace, purpose = ticket.workspace or "", params.get("purpose")
    rows = await gateway.call(lambda s: s.list_files(workspace, purpose, limit + 1, after, order == "asc"))
    return page([file_json(r) for r in rows], limit)


async def get(gateway: Gateway, files: DataFiles, ticket: Ticket, arg: str, proto) -> bytes | None:
    """`{id}` (the file object) or `{id}/content` (its bytes, streamed; then None)."""
    file_id, _, rest = arg.partition("/")
    if rest not in ("", "content"):
        raise ApiError(404, f"Unknown route GET /v1/files/{arg}.", code="not_found")
    row = await load(gateway, ticket, file_id)
    if not rest:
        return _encode(file_json(row))
    transport = proto.response_stream(200, [("content-type", "application/octet-stream"),
                                            ("content-length", str(row["bytes"])), ("x-request-id", ticket.request_id)])
    async for block in read_blocks(files.path(row["path"]), 0, row["bytes"]):
        await transport.send_bytes(block)
    return None


async def delete(gateway: Gateway, files: DataFiles, ticket: Ticket, file_id: str) -> bytes:
    workspace = ticket.workspace or ""
    row = await gateway.call(lambda s: s.delete_file(file_id, workspace))
    if row is None:
        raise _not_found(file_id)
    files.remove(row["path"])  # a batch reading it has its own link to the bytes
    return _encode({"id": file_id, "object": "file", "deleted": True})
