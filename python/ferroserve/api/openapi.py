"""`GET /v1/openapi.json`: our OpenAPI 3.1 document, made from the route table and the wire
Structs, so it cannot drift from the code.

Every route of the app's table (`App._routes`, `App._prefix_routes`) has one or more
operations here (a prefix route serves several paths: `/v1/files/{id}` and its `/content`);
the document refuses to build while a route has none, or an operation names a route the
table does not have. Request and response bodies are the msgspec Structs the handlers decode
with and the Structs in `ferroserve.schemas` that describe what they send; the schemathesis
tests (tests/api/test_openapi_fuzz.py) check live responses against this document.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgspec

from ferroserve.api.admin import CreateKey
from ferroserve.api.batch_embeddings import BatchEmbeddingsRequest
from ferroserve.api.batches import CreateBatch
from ferroserve.api.estimate import EstimateRequest
from ferroserve.errors import DEFAULT_CODES, ErrorEnvelope
from ferroserve.schemas import chat, embeddings, files, gateway, models, responses, status

VERSION = "0.1.0"
# Access levels, as app.py names them.
PUBLIC, USER, INFERENCE, ADMIN = "public", "user", "inference", "admin"


@dataclass(frozen=True)
class Query:
    name: str
    schema: dict[str, Any]
    description: str = ""


@dataclass(frozen=True)
class Op:
    """One documented operation: `path` is its OpenAPI template; `route` the label of the
    route-table entry that serves it (default: `path`)."""

    method: str
    path: str
    operation_id: str
    summary: str
    tag: str
    response: Any = None  # the 200 body's Struct (JSON), or None
    request: Any = None  # the JSON body's Struct, or None
    route: str | None = None
    status: int = 200
    # Other content types of the 200 answer: {type: schema}; `text/event-stream` for streams.
    content: dict[str, dict] = field(default_factory=dict)
    request_content: dict[str, dict] | None = None  # a non-JSON request body: {type: schema}
    query: tuple[Query, ...] = ()
    links: dict[str, dict] = field(default_factory=dict)
    errors: tuple[int, ...] = ()  # statuses beyond those the access level and a body imply
    description: str = ""

    @property
    def label(self) -> str:
        return self.route or self.path


# One server-sent event, as SSE parsers (and schemathesis) read the stream.
_EVENT = {"type": "object", "required": ["data"],
          "properties": {"event": {"type": "string"}, "data": {"type": "string"}, "id": {"type": "string"}}}
SSE = {"text/event-stream": {**_EVENT, "description": "Chunks as `data:` JSON lines, ending with `data: [DONE]`."}}
RESPONSE_EVENTS = {"text/event-stream": {**_EVENT, "description": "Responses API events (`event:` and `data:` lines)."}}
BINARY = {"type": "string", "format": "binary"}


def _int(least: int, most: int, description: str = "") -> dict:
    return {"type": "integer", "minimum": least, "maximum": most, **({"description": description} if description else {})}


_STRING = {"type": "string"}
_WHEN = {"type": "string", "description": "A date (YYYY-MM-DD, UTC; inclusive) or unix seconds."}
_WORKSPACE = Query("workspace", _STRING, "Another workspace (admin keys only); `*` for every workspace.")
_USAGE_FILTERS = (Query("start", _WHEN), Query("end", _WHEN), Query("model", _STRING), _WORKSPACE)


def _link(operation_id: str, **parameters: str) -> dict:
    return {"operationId": operation_id, "parameters": parameters}


_KEY_ID = {"id": "$response.body#/id"}

OPERATIONS: tuple[Op, ...] = (
    # Probes and documents.
    Op("GET", "/health", "health", "Liveness probe: 503 once an engine thread of this process stopped.", "status",
       status.Health),
    Op("GET", "/v1/ready", "ready", "Readiness: 200 once every model is loaded, 503 before and once an engine stopped.",
       "status", status.Ready),
    Op("GET", "/v1/status", "getStatus", "Per-model availability (IPOP's PublicStatus), backends, router health, load.",
       "status", status.PublicStatus,
       query=(Query("ready", {"type": "boolean"}, "List only the models that can serve now."),)),
    Op("GET", "/metrics", "metrics", "Prometheus metrics.", "status",
       content={"text/plain; version=0.0.4; charset=utf-8": {"type": "string"}}),
    Op("GET", "/v1/openapi.json", "getOpenApi", "This document.", "status",
       content={"application/json": {"type": "object"}}),
    # Models.
    Op("GET", "/v1/models", "listModels", "The models this server routes to, with provider, prices, context and health.",
       "models", models.ModelList),
    Op("GET", "/v1/models/{id}", "getModel", "One model (by name or alias).", "models", models.ModelCard,
       route="/v1/models/{id}"),
    # Inference.
    Op("POST", "/v1/chat/completions", "createChatCompletion", "Chat completion (OpenAI), streamed with `stream: true`.",
       "inference", chat.ChatCompletion, chat.ChatCompletionRequest, content=SSE),
    Op("POST", "/v1/completions", "createCompletion", "Text completion (OpenAI legacy), streamed with `stream: true`.",
       "inference", chat.TextCompletion, chat.CompletionRequest, content=SSE),
    Op("POST", "/v1/embeddings", "createEmbedding", "Embeddings (OpenAI).", "inference", embeddings.EmbeddingResponse,
       embeddings.EmbeddingRequest),
    Op("POST", "/v1/responses", "createResponse", "Create a response (OpenAI Responses API).", "responses",
       responses.Response, responses.ResponseCreateRequest, content=RESPONSE_EVENTS,
       links={"GetResponse": _link("getResponse", id="$response.body#/id"),
              "GetInputItems": _link("listInputItems", id="$response.body#/id"),
              "CancelResponse": _link("cancelResponse", id="$response.body#/id"),
              "DeleteResponse": _link("deleteResponse", id="$response.body#/id")}),
    Op("POST", "/v1/responses/input_tokens", "countInputTokens", "The input's tokens as the model would read it.",
       "responses", responses.InputTokens, responses.InputTokensRequest),
    Op("GET", "/v1/responses/{id}", "getResponse", "A stored response; `stream=true` follows a running background one.",
       "responses", responses.Response, route="/v1/responses/{id}", content=RESPONSE_EVENTS,
       query=(Query("stream", {"type": "boolean"}), Query("starting_after", {"type": "integer"}),
              Query("include", {"type": "array", "items": _STRING}, "Not supported: any value is a 400."))),
    Op("GET", "/v1/responses/{id}/input_items", "listInputItems", "The items the response's model read.", "responses",
       responses.InputItemList, route="/v1/responses/{id}",
       query=(Query("order", {"enum": ["asc", "desc"]}), Query("limit", _int(1, 100)), Query("after", _STRING))),
    Op("DELETE", "/v1/responses/{id}", "deleteResponse", "Delete a stored response (a running one is cancelled).",
       "responses", responses.ResponseDeleted, route="/v1/responses/{id}"),
    Op("POST", "/v1/responses/{id}/cancel", "cancelResponse", "Cancel a background response.", "responses",
       responses.Response, route="/v1/responses/{id}/cancel"),
    # Tokens and estimates.
    Op("POST", "/v1/tokenize", "tokenize", "Tokenize a prompt or messages (vLLM's shape).", "tokens",
       chat.TokenizeResponse, chat.TokenizeRequest),
    Op("POST", "/v1/detokenize", "detokenize", "Token ids back to text (vLLM's shape).", "tokens",
       chat.DetokenizeResponse, chat.DetokenizeRequest),
    Op("POST", "/v1/estimate", "estimate", "Tokens, cost and context fit of a request, without running it (IPOP).",
       "tokens", gateway.EstimateResponse, EstimateRequest),
    # Usage and history.
    Op("GET", "/v1/usage", "getUsage", "Usage totals and records (or groups by day or model) of the caller's workspace.",
       "usage", gateway.UsageSummary,
       query=(*_USAGE_FILTERS, Query("group_by", {"enum": ["day", "model"]}), Query("limit", _int(1, 10_000)))),
    Op("GET", "/v1/usage/export", "exportUsage", "Usage records as CSV.", "usage",
       content={"text/csv; charset=utf-8": {"type": "string"}},
       query=(*_USAGE_FILTERS, Query("group_by", {"enum": ["day", "model"]}))),
    Op("GET", "/v1/request-history", "listRequestHistory", "The workspace's recent requests.", "usage",
       gateway.HistoryList, query=(Query("limit", _int(1, 1000)), Query("model", _STRING), _WORKSPACE)),
    Op("GET", "/v1/request-history/{id}", "getRequestHistory", "One request's record.", "usage", gateway.HistoryRecord,
       route="/v1/request-history/{id}"),
    # Admin.
    Op("GET", "/v1/admin/keys", "listKeys", "Every API key (never a secret).", "admin", gateway.ApiKeyList),
    Op("POST", "/v1/admin/keys", "createKey", "Create an API key; the answer holds its secret, shown once.", "admin",
       gateway.ApiKeyObject, CreateKey,
       links={"GetKey": _link("getKey", **_KEY_ID), "RevokeKey": _link("revokeKey", **_KEY_ID)}),
    Op("GET", "/v1/admin/keys/{id}", "getKey", "One API key.", "admin", gateway.ApiKeyObject, route="/v1/admin/keys/{id}"),
    Op("DELETE", "/v1/admin/keys/{id}", "revokeKey", "Revoke an API key.", "admin", gateway.ApiKeyObject,
       route="/v1/admin/keys/{id}"),
    # Files and batches.
    Op("POST", "/v1/files", "uploadFile", "Upload a file: OpenAI's multipart form, or the raw body with `?purpose=`.",
       "files", files.FileObject,
       request_content={
           "multipart/form-data": {"type": "object", "required": ["file", "purpose"], "properties": {
               "file": BINARY, "purpose": {"enum": ["batch", "assistants", "fine-tune", "vision", "user_data", "evals"]}}},
           "application/octet-stream": BINARY,
       },
       query=(Query("purpose", _STRING, "For a raw body: the file's purpose."), Query("filename", _STRING)),
       links={"GetFile": _link("getFile", id="$response.body#/id"),
              "GetFileContent": _link("getFileContent", id="$response.body#/id"),
              "DeleteFile": _link("deleteFile", id="$response.body#/id")}),
    Op("GET", "/v1/files", "listFiles", "The workspace's files.", "files", files.FileList,
       query=(Query("limit", _int(1, 10_000)), Query("after", _STRING), Query("order", {"enum": ["asc", "desc"]}),
              Query("purpose", _STRING))),
    Op("GET", "/v1/files/{id}", "getFile", "A file object.", "files", files.FileObject, route="/v1/files/{id}"),
    Op("GET", "/v1/files/{id}/content", "getFileContent", "A file's bytes.", "files", route="/v1/files/{id}",
       content={"application/octet-stream": BINARY}),
    Op("DELETE", "/v1/files/{id}", "deleteFile", "Delete a file.", "files", files.FileDeleted, route="/v1/files/{id}"),
    Op("POST", "/v1/batches", "createBatch", "Run an uploaded `batch` file (OpenAI).", "files", files.Batch, CreateBatch,
       links={"GetBatch": _link("getBatch", id="$response.body#/id"),
              "CancelBatch": _link("cancelBatch", id="$response.body#/id")}),
    Op("GET", "/v1/batches", "listBatches", "The workspace's batches.", "files", files.BatchList,
       query=(Query("limit", _int(1, 100)), Query("after", _STRING))),
    Op("GET", "/v1/batches/{id}", "getBatch", "A batch.", "files", files.Batch, route="/v1/batches/{id}"),
    Op("POST", "/v1/batches/{id}/cancel", "cancelBatch", "Cancel a batch.", "files", files.Batch,
       route="/v1/batches/{id}/cancel"),
    Op("POST", "/v1/batch/embeddings", "createEmbeddingBatch", "Embed up to 100,000 inputs in the background (NUREV).",
       "files", files.EmbeddingBatch, BatchEmbeddingsRequest, status=201,
       links={"GetEmbeddingBatch": _link("getEmbeddingBatch", id="$response.body#/id"),
              "CancelEmbeddingBatch": _link("cancelEmbeddingBatch", id="$response.body#/id")}),
    Op("GET", "/v1/batch/{id}", "getEmbeddingBatch", "An embedding batch.", "files", files.EmbeddingBatch,
       route="/v1/batch/{id}"),
    Op("GET", "/v1/batch/{id}/results", "getEmbeddingBatchResults", "A signed URL for a completed batch's vectors.",
       "files", files.ResultsUrl, route="/v1/batch/{id}"),
    Op("GET", "/v1/batch/{id}/webhook-deliveries", "listWebhookDeliveries", "The batch's webhook deliveries.", "files",
       files.WebhookDeliveryList, route="/v1/batch/{id}"),
    Op("DELETE", "/v1/batch/{id}", "cancelEmbeddingBatch", "Cancel an embedding batch.", "files", files.EmbeddingBatch,
       route="/v1/batch/{id}"),
    Op("GET", "/v1/batch-results/{id}", "downloadEmbeddingBatchResults",
       "A completed batch's vectors (the signed URL is the credential): JSONL, or `?format=npy`.", "files",
       route="/v1/batch-results/{id}", errors=(403,),
       content={"application/x-ndjson": {"type": "string"}, "application/octet-stream": BINARY},
       query=(Query("expires", _STRING), Query("signature", _STRING), Query("format", {"enum": ["jsonl", "npy"]}))),
)


class UndocumentedRoute(Exception):
    """A route without an operation here, or an operation without a route."""


_ERROR_TEXT = {
    400: "The request is invalid (its body, a parameter, or a value).",
    401: "No API key, or an unknown, revoked or expired one.",
    402: "The workspace's monthly budget is spent.",
    403: "The key may not do this (admin route, another workspace, a model it may not use).",
    404: "No such object in this workspace, or no such model.",
    405: "The path exists, the method does not.",
    413: "The body is larger than the server accepts.",
    429: "The key's requests or tokens per minute are used up; `retry-after` says when to retry.",
    503: "The model or backend cannot serve now (loading, overloaded, down), or the gateway is off.",
}
_REQUEST_ID = {"x-request-id": {"required": True, "schema": _STRING, "description": "The request's id (or the client's own)."}}
_RATE_HEADERS = {name: {"schema": _STRING} for name in (
    "x-ratelimit-limit-requests", "x-ratelimit-remaining-requests", "x-ratelimit-reset-requests",
    "x-ratelimit-limit-tokens", "x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens")}


def _statuses(op: Op, access: str) -> list[int]:
    out = {400, 404, 405, 503, *op.errors}
    if access != PUBLIC:
        out |= {401, 403, 429}
    if access == INFERENCE:
        out.add(402)
    if op.request is not None or op.request_content is not None:
        out.add(413)
    if op.operation_id in ("health", "getOpenApi", "metrics"):
        out = {405, 503} if op.operation_id == "health" else {405}
    return sorted(out)


def _schema_ref(t: Any) -> dict:
    return {"$ref": f"#/components/schemas/{t.__name__}"}


def _operation(op: Op, access: str) -> dict:
    ok: dict[str, Any] = {"description": op.summary, "headers": dict(_REQUEST_ID)}
    content: dict[str, Any] = {}
    if op.response is not None:
        content["application/json"] = {"schema": _schema_ref(op.response)}
    content.update({kind: {"schema": schema} for kind, schema in op.content.items()})
    ok["content"] = content
    if access != PUBLIC:
        ok["headers"].update(_RATE_HEADERS)
    if op.links:
        ok["links"] = op.links
    answers: dict[str, Any] = {str(op.status): ok}
    for code in _statuses(op, access):
        headers = dict(_REQUEST_ID)
        if code == 429:
            headers["retry-after"] = {"required": True, "schema": _STRING}
        elif code == 503:  # sent when waiting helps (a full queue, an open breaker)
            headers["retry-after"] = {"required": False, "schema": _STRING}
        answers[str(code)] = {"description": _ERROR_TEXT[code], "headers": headers,
                              "content": {"application/json": {"schema": _schema_ref(ErrorEnvelope)}}}
    out: dict[str, Any] = {"operationId": op.operation_id, "summary": op.summary, "tags": [op.tag], "responses": answers}
    if op.description:
        out["description"] = op.description
    params = [{"name": name, "in": "path", "required": True, "schema": _STRING}
              for name in _path_names(op.path)]
    params += [{"name": q.name, "in": "query", "required": False, "schema": q.schema,
                **({"description": q.description} if q.description else {})} for q in op.query]
    if params:
        out["parameters"] = params
    if op.request is not None:
        out["requestBody"] = {"required": True, "content": {"application/json": {"schema": _schema_ref(op.request)}}}
    elif op.request_content is not None:
        out["requestBody"] = {"required": True, "content": {k: {"schema": v} for k, v in op.request_content.items()}}
    out["security"] = [] if access == PUBLIC else [{"bearer": []}, {"apiKey": []}]
    if access == ADMIN:
        out["description"] = (out.get("description", "") + " Needs an admin key.").strip()
    return out


def _path_names(path: str) -> list[str]:
    return [part[1:-1] for part in path.split("/") if part.startswith("{") and part.endswith("}")]


def check(routes: list[tuple[str, str, str]]) -> dict[tuple[str, str], str]:
    """`routes`: (method, label, access) of the app's table. Returns each route's access by
    (method, label); raises UndocumentedRoute for a route without an operation or an
    operation without a route."""
    access = {(m, label): a for m, label, a in routes}
    documented = {(op.method, op.label) for op in OPERATIONS}
    missing = sorted(set(access) - documented)
    stale = sorted(documented - set(access))
    if missing or stale:
        raise UndocumentedRoute(f"routes without an operation in api/openapi.py: {missing}; operations without a route: {stale}")
    return access


def _struct_types() -> list[Any]:
    seen: list[Any] = [ErrorEnvelope]
    for op in OPERATIONS:
        for t in (op.request, op.response):
            if t is not None and t not in seen:
                seen.append(t)
    return seen


def document(routes: list[tuple[str, str, str]], server_url: str = "/") -> dict:
    """The OpenAPI 3.1 document for the app's route table."""
    access = check(routes)
    _, components = msgspec.json.schema_components(_struct_types(), ref_template="#/components/schemas/{name}")
    paths: dict[str, dict] = {}
    for op in OPERATIONS:
        paths.setdefault(op.path, {})[op.method.lower()] = _operation(op, access[(op.method, op.label)])
    error_codes = sorted(set(DEFAULT_CODES.values()))
    components["ErrorEnvelope"]["description"] = (
        "Every error: OpenAI's shape; `code` is always a string (e.g. " + ", ".join(error_codes) + ").")
    return {
        "openapi": "3.1.0",
        "info": {"title": "ferroserve", "version": VERSION,
                 "description": "An OpenAI-compatible inference server with a gateway (keys, limits, usage, routing)."},
        "servers": [{"url": server_url}],
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "description": "`Authorization: Bearer KEY`."},
                "apiKey": {"type": "apiKey", "in": "header", "name": "x-api-key"},
            },
        },
        "security": [{"bearer": []}, {"apiKey": []}],
    }
