"""The one interface every backend implements: the api layer and the router speak only this.

A backend object serves one model entry of the configuration (a local engine model, one model
of an OpenAI-compatible upstream, one Triton model). Backends of the same `[[backends]]` table
share its connection pool. Everything here is request-level and async; per-token work stays in
the backend (for the local one, in Rust).

Chat and text completions: `generate(request)` is an async iterator of events ::

    Admitted(prompt_tokens, cached_tokens)       at most once (before the deltas locally; an
                                                 OpenAI upstream reports usage at the end)
    Delta(index, text, token_ids, logprobs)      zero or more per choice
    ToolCallDelta(index, call_index, ...)        a tool call's start (id, name), then its
                                                 arguments in fragments (chat with tools)
    Finished(index, reason, completion_tokens)   once per choice (n of them)
    Failed(error)                                 instead of the rest; the last event

Leaving the iteration early (`aclose()`, or the consuming task cancelled because the client
went away) cancels the request in the backend: the engine aborts it, the upstream's HTTP stream
is closed, Triton's stream is cancelled.

Errors: a request the backend rejects as invalid is a `Failed(ApiError)` (400, naming the
parameter) and is not retried elsewhere. A backend that cannot serve right now (connection
refused, timeout, 429, 5xx, engine overloaded or dead) is `Failed(Unavailable)`: the router tries
the next candidate if nothing has reached the client yet.
"""

from __future__ import annotations

import asyncio
import base64
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable
from typing import Any, Literal

import msgspec
import numpy as np

from ferroserve.errors import ApiError

# (token_id, token bytes, logprob, [(token_id, bytes, logprob) of the top alternatives]).
# Upstreams that do not send token ids use -1.
TokenLogprob = tuple[int, bytes, float, list[tuple[int, bytes, float]]]

HEALTHY, DEGRADED, DOWN = "healthy", "degraded", "down"


class Unavailable(Exception):
    """The backend cannot serve this request now; another candidate may.

    `status` is the upstream's HTTP status when there was one (429, 5xx), `retry_after` its
    Retry-After in seconds when it sent one. `code` is the error code the client gets when no
    candidate serves and every one failed the same way (e.g. `engine_unavailable`)."""

    def __init__(self, reason: str, *, status: int | None = None, retry_after: float | None = None,
                 code: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status
        self.retry_after = retry_after
        self.code = code


class AtCapacity(Unavailable):
    """The backend's admission bound is reached (its queue is full): load, not a fault, so the
    router's breaker does not count it. Another candidate may serve; if none does, the client
    gets 503 `capacity_unavailable` with `retry-after`."""

    def __init__(self, reason: str, retry_after: float = 1.0) -> None:
        super().__init__(reason, status=503, retry_after=retry_after, code="capacity_unavailable")


# Requests ------------------------------------------------------------------------------------
class SamplingParams(msgspec.Struct, kw_only=True):
    """OpenAI sampling fields, defaults filled in (the engine validates ranges)."""

    n: int = 1
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None
    stop: list[str] | None = None
    ignore_eos: bool = False
    logprobs: bool = False
    top_logprobs: int = 0
    # Structured output, OpenAI's `response_format` as checked by the api layer:
    # `{"type": "json_object"}` or `{"type": "json_schema", "json_schema": {...}}`; None for
    # free text. A backend enforces it, forwards it to an upstream that does, or refuses the
    # request (400 on `response_format`): never ignores it.
    response_format: dict[str, Any] | None = None


def response_format_schema(response_format: dict[str, Any]) -> str:
    """The JSON schema (as JSON text) a response format asks for: `json_object` is any object."""
    if response_format["type"] == "json_object":
        return '{"type": "object"}'
    return msgspec.json.encode(response_format["json_schema"].get("schema", {})).decode()


class ToolCall(msgspec.Struct):
    """A function call an assistant message made; `arguments` is JSON text."""

    id: str
    name: str
    arguments: str


class Tool(msgspec.Struct, kw_only=True):
    """A function the model may call; `parameters` is its arguments' JSON schema."""

    name: str
    parameters: dict[str, Any]
    description: str | None = None
    strict: bool | None = None


class Message(msgspec.Struct):
    """A chat message as backends see it: role and text, or content parts `[(type, text)]`;
    an assistant turn's `tool_calls`, a `tool` turn's `tool_call_id`."""

    role: str
    content: str | list[tuple[str, str]]
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None


class ChatRequest(msgspec.Struct, kw_only=True):
    """One generation: `messages` (chat) or `prompt` (a text completion, one prompt)."""

    messages: list[Message] | None = None
    prompt: str | list[int] | None = None
    params: SamplingParams
    # Chat with tools (checked by the api layer): the functions, and which the model must use:
    # "auto" (text or calls), "required" (one or more calls) or "function" (the one named by
    # `tool_choice_function`). `tool_choice` "none" arrives as no tools. A backend enforces
    # it, forwards it, or refuses the request (400 on `tools`).
    tools: list[Tool] | None = None
    tool_choice: str = "auto"
    tool_choice_function: str | None = None
    parallel_tool_calls: bool = True
    # Whether deltas are wanted as they are produced (streaming) or only at the end.
    stream: bool = False
    # Text of the answer already sent to the client by a candidate that stopped mid-stream:
    # the generation continues it (only backends with `can_resume` get such requests).
    resume: str | None = None
    # Per-model memo (e.g. a local model's prompt tokens, so count_tokens and generate tokenize
    # once). Keyed by the model's name.
    memo: dict[str, Any] = {}
    # "interactive" or "batch" (rows of batch jobs: scheduled after interactive work).
    priority: str = "interactive"


class EmbedRequest(msgspec.Struct, kw_only=True):
    """Exactly one of `texts` / `token_lists` (validated by the api layer)."""

    texts: list[str] | None = None
    token_lists: list[list[int]] | None = None
    dimensions: int | None = None
    encoding: Literal["float", "base64"] = "float"
    # "interactive" or "batch" (chunks of batch jobs: scheduled after interactive work).
    priority: str = "interactive"


# Events ---------------------------------------------------------------------------------------
class Admitted(msgspec.Struct):
    prompt_tokens: int
    cached_tokens: int = 0


class Delta(msgspec.Struct):
    index: int
    text: str
    token_ids: list[int] = []
    logprobs: list[TokenLogprob] | None = None


class ToolCallDelta(msgspec.Struct):
    """Part of choice `index`'s tool call number `call_index`: the first part carries its
    `id` and `name`; the `arguments` fragments, concatenated, are the call's JSON text."""

    index: int
    call_index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


class Finished(msgspec.Struct):
    index: int
    reason: str  # "stop" | "length" | "tool_calls" | ...
    completion_tokens: int
    prompt_tokens: int = 0
    cached_tokens: int = 0


class Failed(msgspec.Struct):
    error: Any  # ApiError (the client's fault: not retried) | Unavailable (try the next candidate)


Event = Admitted | Delta | ToolCallDelta | Finished | Failed


# Embeddings -------------------------------------------------------------------------------------
class EmbeddingResult(msgspec.Struct):
    """The vectors of one request and its prompt tokens.

    Backends return float32 `vectors` (one row per input; the local engine's own buffer, not a
    copy) and `data_json()` encodes OpenAI's `data` array from them; an OpenAI-compatible
    upstream hands back its `data` array as it came (`encoded`)."""

    prompt_tokens: int
    encoded: bytes | None = None
    vectors: Any = None  # np.ndarray float32 (n, d)

    def data_json(self, encoding: str) -> bytes:
        if self.encoded is not None:
            return self.encoded
        return encode_vectors(self.vectors, encoding)

    def as_array(self) -> np.ndarray:
        """The vectors as float32 (decoding the upstream's JSON when that is what we have)."""
        if self.vectors is not None:
            return self.vectors
        rows = msgspec.json.decode(self.encoded or b"[]")
        out = []
        for row in rows:
            e = row["embedding"]
            out.append(np.frombuffer(base64.b64decode(e), dtype="<f4") if isinstance(e, str) else np.asarray(e, dtype=np.float32))
        return np.stack(out) if out else np.zeros((0, 0), np.float32)


_encode_json = msgspec.json.Encoder().encode


def encode_vectors(vectors: np.ndarray, encoding: str) -> bytes:
    """OpenAI's `data` array for float32 vectors: per row, base64 of its little-endian float32
    bytes, or its numbers. A number is the float32 widened to a double (the same value; msgspec
    writes the double's shortest digits), so any JSON reader gets back exactly the float32.
    Both paths run at C speed: numpy's `tolist`, `base64`, msgspec."""
    vectors = np.ascontiguousarray(vectors, dtype="<f4")
    rows: list[Any]
    if encoding == "base64":
        rows = [base64.b64encode(row).decode("ascii") for row in vectors]
    else:
        if not np.isfinite(vectors).all():  # JSON has no NaN or infinity
            vectors = np.nan_to_num(vectors, nan=0.0, posinf=0.0, neginf=0.0)
        rows = vectors.tolist()
    return _encode_json([{"object": "embedding", "index": i, "embedding": row} for i, row in enumerate(rows)])


# What a backend tells about itself ------------------------------------------------------------
class BackendInfo(msgspec.Struct, kw_only=True):
    kind: str  # "local" | "upstream" | "triton"
    backend: str  # the [[backends]] name ("local" for this process's engine)
    capabilities: list[str]  # "chat", "completions", "embeddings"
    context_length: int | None = None
    dimensions: int | None = None
    device: str | None = None  # local: "cpu(avx512)"...; remote: its base URL
    owned_by: str = "ferroserve"
    input_usd_per_million_tokens: float = 0.0
    output_usd_per_million_tokens: float = 0.0


class BackendStats(msgspec.Struct, kw_only=True):
    """Live load. `queue_depth` waits, `running` computes; rates are tokens/s of the backend
    itself where it knows them (the router measures its own per candidate either way)."""

    queue_depth: int = 0
    running: int = 0
    kv_usage: float | None = None
    prefill_tokens_per_s: float | None = None
    decode_tokens_per_s: float | None = None


class Backend(ABC):
    """One servable model. Subclasses implement `generate` (chat/completions) and/or `embed`."""

    name: str  # the model entry's name (what clients ask for)
    # Can continue an answer another backend started (`ChatRequest.resume`).
    can_resume = False
    # Set by the registry: call when what `info()` returns changed (e.g. learnt from a remote).
    info_changed: Callable[[], None] | None = None

    @abstractmethod
    def info(self) -> BackendInfo: ...

    def health(self) -> str:
        """The backend's own view: HEALTHY, DEGRADED or DOWN (the router adds its breaker)."""
        return HEALTHY

    def stats(self) -> BackendStats:
        return BackendStats()

    def engine_stats(self) -> dict | None:
        """This process's engine counters for /metrics (local models only)."""
        return None

    def fault(self) -> str | None:
        """Why a part of this process that serves the model is dead (a local engine thread
        that stopped), or None. `/health` and `/v1/ready` answer 503 while any model has one;
        remote backends have none (their outages are the router's business)."""
        return None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Called once on the serving event loop before any request."""

    def stop(self) -> None:
        """Called once when the worker stops."""

    # Chat and text completions.
    def count_tokens(self, request: ChatRequest) -> int:
        """The prompt's tokens (exact where the backend has the tokenizer, else an estimate)."""
        raise ApiError(400, f"The model `{self.name}` does not generate text.", param="model", code="model_not_supported")

    def generate(self, request: ChatRequest) -> AsyncIterator[Event]:
        raise ApiError(400, f"The model `{self.name}` does not generate text.", param="model", code="model_not_supported")

    # Embeddings.
    def count_embed_tokens(self, request: EmbedRequest) -> int:
        raise ApiError(400, f"The model `{self.name}` does not create embeddings.", param="model", code="model_not_supported")

    async def embed(self, request: EmbedRequest) -> EmbeddingResult:
        raise ApiError(400, f"The model `{self.name}` does not create embeddings.", param="model", code="model_not_supported")

    # Tokenizer access for /v1/tokenize, /v1/detokenize (local models only).
    def tokenizer(self) -> Any | None:
        return None


def estimate_tokens(request: ChatRequest) -> int:
    """About four bytes per token: for backends without our tokenizer (settled later with the
    usage the backend reports)."""
    if request.messages is not None:
        size = 0
        for m in request.messages:
            c = m.content
            size += len(c.encode()) if isinstance(c, str) else sum(len(t.encode()) for _, t in c)
            size += 16  # role and template tokens
            for call in m.tool_calls or ():
                size += len(call.name) + len(call.arguments.encode())
        for tool in request.tools or ():
            size += len(msgspec.json.encode(tool))
        return max(1, size // 4)
    p = request.prompt
    if isinstance(p, list):
        return len(p)
    return max(1, len((p or "").encode()) // 4)
