"""The upstream backend: a model served by another OpenAI-compatible HTTP API.

Every model entry on one `[[backends]]` table shares one `UpstreamPool` (its connections, its
in-flight limit and its health), kept in the `pools` dict the registry hands to `create`.
`http://` upstreams are reached through `http1.py` (a keep-alive HTTP/1.1 client costing a
tenth of httpx per request), `https://` ones through an `httpx.AsyncClient` (TLS, HTTP/2).

Generation always asks the upstream to stream (`stream: true`, usage included) whatever the
client asked for, so a non-streaming client's request is cancellable too and nothing is
buffered: SSE lines are split from the raw body and each `data:` payload is decoded by a typed
msgspec decoder into the backend events of `base.py`.

OpenAI reports usage once, at the end, for all choices together. So `Admitted` and the
`Finished` events are held until the usage arrives (or the stream ends) and then yielded in
that order: here `Admitted` follows the deltas (the prompt's tokens are not known earlier). Completion tokens per choice: each choice's counted tokens (logprob entries when
there are logprobs, else one per content chunk, which is exact for servers sending one token
per chunk), scaled to the reported total with largest remainders when the two disagree; the
sum over choices always equals the upstream's `usage.completion_tokens`.

Error mapping (one table, `_status_error`): connection errors, timeouts, 408, 429, 5xx, and
the 401/403/404 that mean our own credentials or configuration are wrong are `Unavailable`
(another candidate may serve); any other 4xx is the client's `ApiError` with the upstream's
message, param and code.
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import os
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import msgspec
import numpy as np

from ferroserve.backends import http1
from ferroserve.backends.base import (
    DEGRADED,
    DOWN,
    HEALTHY,
    Admitted,
    Backend,
    BackendInfo,
    BackendStats,
    ChatRequest,
    Delta,
    EmbeddingResult,
    EmbedRequest,
    Event,
    Failed,
    Finished,
    Message,
    TokenLogprob,
    ToolCallDelta,
    Unavailable,
    estimate_tokens,
)
from ferroserve.config import BackendSpec, ModelSpec
from ferroserve.errors import ApiError

# After a 5xx, 429 or read timeout the upstream reports DEGRADED for this long.
DEGRADED_WINDOW_S = 30.0
# Upstream error bodies are read up to this size (an error page must not be streamed whole).
MAX_ERROR_BODY_BYTES = 64 * 1024


# Upstream wire types (only the fields we read) --------------------------------------------------
class _PromptDetails(msgspec.Struct):
    cached_tokens: int | None = None


class _Usage(msgspec.Struct):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    prompt_tokens_details: _PromptDetails | None = None


class _StreamError(msgspec.Struct):
    message: str = "the upstream reported an error mid-stream"


class _TopLogprob(msgspec.Struct):
    token: str
    logprob: float
    bytes: list[int] | None = None


class _ChatTokenLogprob(msgspec.Struct):
    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[_TopLogprob] = []


class _ChatLogprobs(msgspec.Struct):
    content: list[_ChatTokenLogprob] | None = None


class _FunctionIn(msgspec.Struct):
    name: str | None = None
    arguments: str | None = None


class _ToolCallIn(msgspec.Struct):
    """A tool call in an upstream's answer (a stream's delta carries `index`)."""

    index: int = 0
    id: str | None = None
    function: _FunctionIn | None = None


class _ChatDelta(msgspec.Struct):
    content: str | None = None
    tool_calls: list[_ToolCallIn] | None = None


class _ChatChoice(msgspec.Struct):
    index: int = 0
    delta: _ChatDelta | None = None
    logprobs: _ChatLogprobs | None = None
    finish_reason: str | None = None


class _ChatChunk(msgspec.Struct):
    choices: list[_ChatChoice] = []
    usage: _Usage | None = None
    error: _StreamError | None = None


class _CompletionLogprobs(msgspec.Struct):
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] | None = None


class _CompletionChoice(msgspec.Struct):
    index: int = 0
    text: str = ""
    logprobs: _CompletionLogprobs | None = None
    finish_reason: str | None = None


class _CompletionChunk(msgspec.Struct):
    choices: list[_CompletionChoice] = []
    usage: _Usage | None = None
    error: _StreamError | None = None


# A non-streaming answer, for upstreams that ignore `stream: true`.
class _ChatMessageOut(msgspec.Struct):
    content: str | None = None
    tool_calls: list[_ToolCallIn] | None = None


class _ChatFullChoice(msgspec.Struct):
    index: int = 0
    message: _ChatMessageOut | None = None
    logprobs: _ChatLogprobs | None = None
    finish_reason: str | None = None


class _ChatFull(msgspec.Struct):
    choices: list[_ChatFullChoice] = []
    usage: _Usage | None = None


class _EmbeddingPassThrough(msgspec.Struct):
    """The upstream's `data` array kept as its bytes: passed to the client as the upstream
    wrote it (its float formatting, or its base64), with no decode and re-encode."""

    data: msgspec.Raw
    usage: _Usage | None = None


class _ErrorBody(msgspec.Struct):
    message: str | None = None
    param: str | None = None
    code: str | int | None = None


class _ErrorEnvelope(msgspec.Struct):
    error: _ErrorBody | str | None = None
    # Some servers (FastAPI defaults) answer {"detail": ...}.
    detail: Any = None
    message: str | None = None


_encode = msgspec.json.Encoder().encode
_decode_chat_chunk = msgspec.json.Decoder(_ChatChunk).decode
_decode_completion_chunk = msgspec.json.Decoder(_CompletionChunk).decode
_decode_chat_full = msgspec.json.Decoder(_ChatFull).decode
_decode_completion_full = msgspec.json.Decoder(_CompletionChunk).decode
_decode_embeddings_raw = msgspec.json.Decoder(_EmbeddingPassThrough).decode


class _ModelList(msgspec.Struct):
    data: list[dict[str, Any]] = []


_decode_model_list = msgspec.json.Decoder(_ModelList).decode
# Where OpenAI-compatible servers put a model's context window (ours, vLLM, Neural Router).
_CONTEXT_KEYS = ("context_length", "max_model_len", "context_window")
DISCOVERY_RETRY_S = 30.0
_decode_error = msgspec.json.Decoder(_ErrorEnvelope).decode

_STREAM_HEADERS = {"accept": "text/event-stream", "accept-encoding": "identity", "content-type": "application/json"}
_JSON_HEADERS = {"accept": "application/json", "accept-encoding": "identity", "content-type": "application/json"}
_HEADER_LINES = {id(h): "".join(f"{k}: {v}\r\n" for k, v in h.items()) for h in (_STREAM_HEADERS, _JSON_HEADERS)}
# What a failed exchange raises, from either client.
_TRANSPORT_ERRORS = (httpx.HTTPError, http1.TransportError)


# The shared pool of one [[backends]] table ---------------------------------------------------------
class UpstreamPool:
    """One upstream's connections, in-flight limit and health, shared by its models.

    `http://` upstreams go through `http1.Http1Pool` (keep-alive HTTP/1.1 with a fraction of
    httpx's per-request cost; see http1.py); `https://` ones through an `httpx.AsyncClient`
    (TLS, HTTP/2 by ALPN when `http2`). Both are made on first use, on the loop that uses
    them (connections belong to one event loop)."""

    def __init__(self, spec: BackendSpec) -> None:
        self.spec = spec
        self.client: httpx.AsyncClient | None = None
        self.http1: http1.Http1Pool | None = None
        self.plain_http = spec.base_url.startswith("http://")
        self.limit = asyncio.Semaphore(spec.max_concurrent)
        self.waiting = 0
        self.running = 0
        self.connect_failures = 0  # consecutive, reset by any HTTP answer
        self.last_overload = -DEGRADED_WINDOW_S  # monotonic time of the last 5xx / 429 / read timeout

    def auth_headers(self) -> dict[str, str]:
        key_env = self.spec.api_key_env
        return {"authorization": f"Bearer {os.environ[key_env]}"} if key_env else {}

    async def post(self, path: str, body: bytes, headers: dict[str, str], method: str = "POST") -> Any:
        """POSTs `body` and returns the response once its head arrived (body unread): an
        `http1.Response` or an `httpx.Response`, which share what we use of them."""
        if self.plain_http:
            if self.http1 is None:
                self.http1 = http1.Http1Pool(self.spec.base_url, self.auth_headers(),
                                             connect_timeout_s=self.spec.connect_timeout_s,
                                             read_timeout_s=self.spec.read_timeout_s)
            return await self.http1.request(method, path, body, _HEADER_LINES[id(headers)])
        client = self.get_client()
        return await client.send(client.build_request(method, path, content=body, headers=headers), stream=True)

    async def model_list(self) -> dict[str, dict]:
        """The upstream's `GET /models` by model id (aliases too, where it lists them)."""
        response = await self.post("/models", b"", _JSON_HEADERS, method="GET")
        try:
            self.note_answer(response.status_code)
            if response.status_code != 200:
                raise Unavailable(f"upstream {self.spec.name}: GET /models answered {response.status_code}")
            listing = _decode_model_list(await response.aread())
        finally:
            await response.aclose()
        out: dict[str, dict] = {}
        for card in listing.data:
            for name in (card.get("id"), *(card.get("aliases") or ())):
                if isinstance(name, str):
                    out[name] = card
        return out

    def get_client(self) -> httpx.AsyncClient:
        if self.client is None:
            s = self.spec
            headers = self.auth_headers()
            self.client = httpx.AsyncClient(
                base_url=s.base_url.rstrip("/"),
                headers=headers,
                timeout=httpx.Timeout(connect=s.connect_timeout_s, read=s.read_timeout_s,
                                      write=s.read_timeout_s, pool=s.read_timeout_s),
                limits=httpx.Limits(max_connections=s.max_concurrent, max_keepalive_connections=s.max_concurrent),
                http2=s.http2,
                # The pool's own settings only: no proxies or .netrc from the environment.
                trust_env=False,
            )
        return self.client

    def health(self) -> str:
        if self.connect_failures:
            return DOWN
        if time.monotonic() - self.last_overload < DEGRADED_WINDOW_S:
            return DEGRADED
        return HEALTHY

    def note_answer(self, status: int) -> None:
        self.connect_failures = 0
        if status >= 500 or status == 429:
            self.last_overload = time.monotonic()

    def note_transport_error(self, exc: Exception) -> Unavailable:
        """Records a failed exchange and returns what the caller reports."""
        if isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout, http1.ConnectError)):
            self.connect_failures += 1
            what = "cannot connect to"
        else:
            self.last_overload = time.monotonic()
            timeout = isinstance(exc, (httpx.TimeoutException, http1.ReadTimeout))
            what = "timed out waiting for" if timeout else "lost the connection to"
        return Unavailable(f"{what} upstream {self.spec.name} ({self.spec.base_url}): {type(exc).__name__} {exc}".rstrip())

    async def aclose(self) -> None:
        pool, self.http1 = self.http1, None
        if pool is not None:
            pool.close()
        client, self.client = self.client, None
        if client is not None:
            await client.aclose()


def create(spec: ModelSpec, backend: BackendSpec, pools: dict) -> UpstreamBackend:
    """The model `spec` on upstream `backend`; `pools` maps backend names to their shared pool."""
    pool = pools.get(backend.name)
    if pool is None:
        pool = pools[backend.name] = UpstreamPool(backend)
    return UpstreamBackend(spec, pool)


# The backend ----------------------------------------------------------------------------------------
class UpstreamBackend(Backend):
    def __init__(self, spec: ModelSpec, pool: UpstreamPool) -> None:
        self.name = spec.name
        self.spec = spec
        self.pool = pool
        self.upstream_model = spec.upstream_model or spec.name
        self._loop: asyncio.AbstractEventLoop | None = None
        # What the upstream's GET /models said about this model (context window, dimensions).
        self.discovered: dict[str, int] = {}
        self._discovery: asyncio.Task | None = None

    def info(self) -> BackendInfo:
        s = self.spec
        context_length = s.options.get("context_length", self.discovered.get("context_length"))
        dimensions = s.options.get("dimensions", self.discovered.get("dimensions"))
        return BackendInfo(
            kind="upstream", backend=self.pool.spec.name,
            capabilities=["chat", "completions"] if s.kind == "chat" else ["embeddings"],
            context_length=int(context_length) if context_length is not None else None,
            dimensions=int(dimensions) if dimensions is not None else None,
            device=self.pool.spec.base_url, owned_by=s.owned_by,
            input_usd_per_million_tokens=s.input_usd_per_million_tokens,
            output_usd_per_million_tokens=s.output_usd_per_million_tokens,
        )

    def health(self) -> str:
        return self.pool.health()

    def stats(self) -> BackendStats:
        return BackendStats(queue_depth=self.pool.waiting, running=self.pool.running)

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        if "context_length" not in self.spec.options or (self.spec.kind == "embedding" and "dimensions" not in self.spec.options):
            self._discovery = loop.create_task(self._discover())

    async def _discover(self) -> None:
        """Learns the model's context window (and an embedding model's dimensions) from the
        upstream's model list, for /v1/models and the router; retried while the upstream is
        unreachable. Configured `options` win."""
        while True:
            try:
                card = (await self.pool.model_list()).get(self.upstream_model)
            except (Unavailable, msgspec.DecodeError, *_TRANSPORT_ERRORS) as exc:
                if isinstance(exc, _TRANSPORT_ERRORS):
                    self.pool.note_transport_error(exc)
                await asyncio.sleep(DISCOVERY_RETRY_S)
                continue
            if card is not None:
                found = {"context_length": next((card[k] for k in _CONTEXT_KEYS if isinstance(card.get(k), int)), None),
                         "dimensions": card.get("dimensions") if isinstance(card.get("dimensions"), int) else None}
                self.discovered = {k: v for k, v in found.items() if v is not None}
                if self.info_changed is not None:
                    self.info_changed()
            return

    def stop(self) -> None:
        if self._discovery is not None:
            self._discovery.cancel()
        if self.pool.client is None and self.pool.http1 is None:
            return
        try:
            asyncio.get_running_loop().create_task(self.pool.aclose())
        except RuntimeError:  # not on a loop: on the serving loop if it still runs, else nothing to do
            if self._loop is not None and self._loop.is_running():
                asyncio.run_coroutine_threadsafe(self.pool.aclose(), self._loop)

    # Chat and text completions.
    def count_tokens(self, request: ChatRequest) -> int:
        if self.spec.kind != "chat":
            return super().count_tokens(request)
        return estimate_tokens(request)

    def generate(self, request: ChatRequest) -> AsyncIterator[Event]:
        if self.spec.kind != "chat":
            return super().generate(request)
        return self._generate(request)

    async def _generate(self, request: ChatRequest) -> AsyncIterator[Event]:
        chat = request.messages is not None
        body = self._generation_body(request, chat)
        pool = self.pool
        n = request.params.n
        response: Any = None  # an http1.Response or an httpx.Response
        pool.waiting += 1
        try:
            await pool.limit.acquire()
        finally:
            pool.waiting -= 1
        pool.running += 1
        try:
            try:
                # A buffered answer is asked for as one JSON answer: one read and one decode
                # instead of a wake-up per token (nothing reaches the client before it ends).
                response = await pool.post("/chat/completions" if chat else "/completions", body,
                                           _STREAM_HEADERS if request.stream else _JSON_HEADERS)
                pool.note_answer(response.status_code)
                if response.status_code != 200:
                    yield Failed(await _status_error(response, pool.spec.name))
                    return
                if not response.headers.get("content-type", "").startswith("text/event-stream"):
                    # An upstream that ignored `stream: true`: one JSON answer.
                    for event in _full_events(await response.aread(), chat, n, request):
                        yield event
                    return
                stream = _SseStream(chat, n)
                encoding = response.headers.get("content-encoding", "identity")
                if encoding != "identity" and not isinstance(response, httpx.Response):
                    yield Failed(Unavailable(f"upstream {pool.spec.name} compressed its stream ({encoding}) though asked not to"))
                    return
                raw = response.aiter_raw() if encoding == "identity" else response.aiter_bytes()
                async for piece in raw:
                    # Read on after [DONE] to the body's end, so the connection is reused.
                    for event in stream.feed(piece):
                        yield event
                for event in stream.finish(request):
                    yield event
            except _TRANSPORT_ERRORS as exc:
                yield Failed(pool.note_transport_error(exc))
            except _StreamFailure as exc:
                yield Failed(Unavailable(f"upstream {pool.spec.name}: {exc}", status=exc.status))
            except msgspec.DecodeError as exc:
                yield Failed(Unavailable(f"upstream {pool.spec.name} sent an unreadable stream: {exc}"))
        finally:
            pool.running -= 1
            pool.limit.release()
            if response is not None:
                # Also when the consumer stopped early: closing mid-body drops the connection,
                # which is how the upstream learns the request is cancelled.
                await response.aclose()

    def _generation_body(self, request: ChatRequest, chat: bool) -> bytes:
        p = request.params
        body: dict[str, Any] = {"model": self.upstream_model, "stream": request.stream}
        if request.stream:
            body["stream_options"] = {"include_usage": True}
        if chat:
            body["messages"] = [_message_json(m) for m in request.messages or ()]
            if request.tools:
                # Enforced (or not) by the upstream, as the client asked.
                body["tools"] = [
                    {"type": "function", "function": {
                        "name": t.name, "parameters": t.parameters,
                        **({"description": t.description} if t.description is not None else {}),
                        **({"strict": t.strict} if t.strict is not None else {}),
                    }}
                    for t in request.tools
                ]
                body["tool_choice"] = (request.tool_choice if request.tool_choice != "function"
                                       else {"type": "function", "function": {"name": request.tool_choice_function}})
                if not request.parallel_tool_calls:
                    body["parallel_tool_calls"] = False
        else:
            body["prompt"] = request.prompt
        body["temperature"] = p.temperature
        body["top_p"] = p.top_p
        if p.max_tokens is not None:
            body["max_tokens"] = p.max_tokens
        if p.n != 1:
            body["n"] = p.n
        if p.seed is not None:
            body["seed"] = p.seed
        if p.presence_penalty:
            body["presence_penalty"] = p.presence_penalty
        if p.frequency_penalty:
            body["frequency_penalty"] = p.frequency_penalty
        if p.logit_bias:
            body["logit_bias"] = {str(k): v for k, v in p.logit_bias.items()}
        if p.stop:
            body["stop"] = p.stop
        if p.logprobs:
            if chat:
                body["logprobs"] = True
                if p.top_logprobs:
                    body["top_logprobs"] = p.top_logprobs
            else:
                body["logprobs"] = p.top_logprobs
        # Vendor extensions (vLLM, llama.cpp, ferroserve): only when asked for, since strict
        # upstreams reject unknown fields.
        if p.top_k > 0:
            body["top_k"] = p.top_k
        if p.min_p > 0.0:
            body["min_p"] = p.min_p
        if p.ignore_eos:
            body["ignore_eos"] = True
        if p.response_format is not None:
            # Enforced (or refused) by the upstream, as the client asked.
            body["response_format"] = p.response_format
        return _encode(body)

    # Embeddings.
    def count_embed_tokens(self, request: EmbedRequest) -> int:
        if self.spec.kind == "chat":
            return super().count_embed_tokens(request)
        if request.token_lists is not None:
            return sum(len(t) for t in request.token_lists)
        return sum(max(1, len(t.encode()) // 4) for t in request.texts or ())

    async def embed(self, request: EmbedRequest) -> EmbeddingResult:
        if self.spec.kind == "chat":
            return await super().embed(request)
        body: dict[str, Any] = {
            "model": self.upstream_model,
            "input": request.texts if request.texts is not None else request.token_lists,
            "encoding_format": request.encoding,  # the client's: the data array is passed through
        }
        if request.dimensions is not None:
            body["dimensions"] = request.dimensions
        pool = self.pool
        pool.waiting += 1
        try:
            await pool.limit.acquire()
        finally:
            pool.waiting -= 1
        pool.running += 1
        try:
            response = None
            try:
                response = await pool.post("/embeddings", _encode(body), _JSON_HEADERS)
                pool.note_answer(response.status_code)
                if response.status_code != 200:
                    raise await _status_error(response, pool.spec.name)
                content = await response.aread()
            except _TRANSPORT_ERRORS as exc:
                raise pool.note_transport_error(exc) from None
            try:
                answer = _decode_embeddings_raw(content)
            except msgspec.DecodeError as exc:
                raise Unavailable(f"upstream {pool.spec.name} sent an unreadable embeddings answer: {exc}") from None
        finally:
            pool.running -= 1
            pool.limit.release()
            if response is not None:
                await response.aclose()
        return EmbeddingResult(
            prompt_tokens=answer.usage.prompt_tokens if answer.usage else self.count_embed_tokens(request),
            encoded=bytes(answer.data),
        )


# Streaming ---------------------------------------------------------------------------------------------
class _StreamFailure(Exception):
    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class _SseStream:
    """Splits SSE bytes into events and turns their `data:` payloads into backend events.

    Only `data:` fields matter; an event ends at a blank line (several `data:` lines of one
    event are joined with newlines, as the SSE spec says)."""

    __slots__ = ("chat", "n", "buffer", "data", "done", "usage", "reasons", "counted", "decode")

    def __init__(self, chat: bool, n: int) -> None:
        self.chat = chat
        self.n = n
        self.buffer = b""
        self.data: list[bytes] = []
        self.done = False
        self.usage: _Usage | None = None
        self.reasons: dict[int, str] = {}
        self.counted = [0] * n
        self.decode: Callable[[bytes], _ChatChunk | _CompletionChunk] = _decode_chat_chunk if chat else _decode_completion_chunk

    def feed(self, piece: bytes) -> list[Event]:
        events: list[Event] = []
        buffer = self.buffer + piece if self.buffer else piece
        start = 0
        while not self.done:
            end = buffer.find(b"\n", start)
            if end < 0:
                break
            line = buffer[start:end]
            start = end + 1
            if line.endswith(b"\r"):
                line = line[:-1]
            if not line:
                if self.data:
                    self._dispatch(b"\n".join(self.data) if len(self.data) > 1 else self.data[0], events)
                    self.data = []
            elif line.startswith(b"data:"):
                self.data.append(line[6:] if line[5:6] == b" " else line[5:])
            # Comments (": keep-alive"), `event:`, `id:` and `retry:` lines carry nothing we use.
        self.buffer = buffer[start:]
        return events

    def _dispatch(self, data: bytes, events: list[Event]) -> None:
        if data == b"[DONE]":
            self.done = True
            return
        chunk = self.decode(data)
        if chunk.error is not None:
            raise _StreamFailure(chunk.error.message)
        if chunk.usage is not None:
            self.usage = chunk.usage
        if isinstance(chunk, _ChatChunk):
            for c in chunk.choices:
                if c.delta is not None and c.delta.tool_calls:
                    if c.index >= len(self.counted):
                        self.counted.extend([0] * (c.index + 1 - len(self.counted)))
                    for call in c.delta.tool_calls:
                        self.counted[c.index] += 1
                        events.append(_tool_call_event(c.index, call.index, call))
                self._choice(c.index, c.delta.content if c.delta is not None else None,
                             _chat_logprobs(c.logprobs) if c.logprobs is not None else None, c.finish_reason, events)
        else:
            for d in chunk.choices:
                self._choice(d.index, d.text, _completion_logprobs(d.logprobs) if d.logprobs is not None else None,
                             d.finish_reason, events)

    def _choice(self, i: int, text: str | None, logprobs: list[TokenLogprob] | None, reason: str | None,
                events: list[Event]) -> None:
        if i >= len(self.counted):
            self.counted.extend([0] * (i + 1 - len(self.counted)))
        if text or logprobs:
            self.counted[i] += len(logprobs) if logprobs else 1
            events.append(Delta(i, text or "", [], logprobs))
        if reason is not None:
            self.reasons[i] = reason

    def finish(self, request: ChatRequest) -> list[Event]:
        """The last events once the body ended: Admitted and the Finished events."""
        events: list[Event] = []
        if self.data and not self.done:  # a last event without its blank line
            self._dispatch(b"\n".join(self.data), events)
        if not self.done and len(self.reasons) < self.n:
            raise _StreamFailure("the stream ended before every choice finished")
        return events + _settle(self.usage, self.counted, self.reasons, request)


def _message_json(m: Message) -> dict[str, Any]:
    out: dict[str, Any] = {"role": m.role, "content": m.content if isinstance(m.content, str)
                           else [{"type": kind, "text": text} for kind, text in m.content]}
    if m.tool_calls:
        out["tool_calls"] = [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                             for c in m.tool_calls]
        if not out["content"]:
            out["content"] = None
    if m.tool_call_id is not None:
        out["tool_call_id"] = m.tool_call_id
    return out


def _tool_call_event(index: int, call_index: int, call: _ToolCallIn) -> ToolCallDelta:
    f = call.function
    return ToolCallDelta(index, call_index, call.id, f.name if f is not None else None,
                         (f.arguments or "") if f is not None else "")


def _settle(usage: _Usage | None, counted: list[int], finish: dict[int, str], request: ChatRequest) -> list[Event]:
    if usage is not None:
        prompt_tokens = usage.prompt_tokens
        cached = (usage.prompt_tokens_details.cached_tokens or 0) if usage.prompt_tokens_details else 0
        per_choice = _split_tokens(usage.completion_tokens, counted)
    else:  # an upstream that ignores stream_options: our estimate and the counted tokens
        prompt_tokens, cached, per_choice = estimate_tokens(request), 0, counted
    events: list[Event] = [Admitted(prompt_tokens, cached)]
    for i, tokens in enumerate(per_choice):
        events.append(Finished(i, finish.get(i, "stop"), tokens, prompt_tokens, cached))
    return events


def _split_tokens(total: int, counted: list[int]) -> list[int]:
    """`total` over the choices in proportion to their counted tokens (largest remainders;
    evenly when nothing was counted). Exact counts when they already add up."""
    counted_sum = sum(counted)
    if counted_sum == total:
        return list(counted)
    n = len(counted)
    if counted_sum == 0:
        return [total // n + (1 if i < total % n else 0) for i in range(n)]
    shares = [total * c // counted_sum for c in counted]
    rest = total - sum(shares)
    by_remainder = sorted(range(n), key=lambda i: -(total * counted[i] % counted_sum))
    for i in by_remainder[:rest]:
        shares[i] += 1
    return shares


def _token_bytes(token: str, raw: list[int] | None) -> bytes:
    return bytes(raw) if raw is not None else token.encode()


def _chat_logprobs(lp: _ChatLogprobs) -> list[TokenLogprob] | None:
    if not lp.content:
        return None
    return [
        (-1, _token_bytes(t.token, t.bytes), t.logprob, [(-1, _token_bytes(a.token, a.bytes), a.logprob) for a in t.top_logprobs])
        for t in lp.content
    ]


def _completion_logprobs(lp: _CompletionLogprobs) -> list[TokenLogprob] | None:
    if not lp.tokens:
        return None
    tops = lp.top_logprobs or [None] * len(lp.tokens)
    out: list[TokenLogprob] = []
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, tops):
        alternatives = [(-1, k.encode(), v) for k, v in top.items()] if top else []
        out.append((-1, token.encode(), logprob if logprob is not None else 0.0, alternatives))
    return out


def _full_events(data: bytes, chat: bool, n: int, request: ChatRequest) -> list[Event]:
    """The events of a non-streaming answer."""
    counted = [0] * n
    finish: dict[int, str] = {}
    deltas: list[Event] = []
    if chat:
        full = _decode_chat_full(data)
        for c in full.choices:
            text = c.message.content if c.message is not None else None
            if c.index < n and text:
                counted[c.index] = 1
                deltas.append(Delta(c.index, text, [], _chat_logprobs(c.logprobs) if c.logprobs else None))
            if c.index < n and c.message is not None and c.message.tool_calls:
                counted[c.index] = 1
                deltas.extend(_tool_call_event(c.index, k, call) for k, call in enumerate(c.message.tool_calls))
            if c.finish_reason is not None:
                finish[c.index] = c.finish_reason
        usage = full.usage
    else:
        comp = _decode_completion_full(data)
        for d in comp.choices:
            if d.index < n and d.text:
                counted[d.index] = 1
                deltas.append(Delta(d.index, d.text, [], _completion_logprobs(d.logprobs) if d.logprobs else None))
            if d.finish_reason is not None:
                finish[d.index] = d.finish_reason
        usage = comp.usage
    return deltas + _settle(usage, counted, finish, request)


# Errors ------------------------------------------------------------------------------------------------
async def _status_error(response: httpx.Response, upstream: str) -> Exception:
    """The exception for a non-200 answer (see the module docstring for the table)."""
    status = response.status_code
    body = b""
    async for piece in response.aiter_raw():
        body += piece
        if len(body) >= MAX_ERROR_BODY_BYTES:
            break
    message, param, code = _error_fields(body)
    if status in (401, 403):
        return Unavailable(f"upstream {upstream} rejected our credentials ({status}): {message}", status=status)
    if status == 404:
        return Unavailable(f"upstream {upstream} does not serve this model or path (404): {message}", status=status)
    if status in (408, 429) or status >= 500:
        return Unavailable(f"upstream {upstream} answered {status}: {message}", status=status,
                           retry_after=_retry_after(response.headers))
    if 400 <= status < 500:
        return ApiError(status, message, param=param, code=code)
    return Unavailable(f"upstream {upstream} answered an unexpected {status}: {message}", status=status)


def _error_fields(body: bytes) -> tuple[str, str | None, str | None]:
    try:
        envelope = _decode_error(body)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return body[:500].decode(errors="replace").strip() or "no error message", None, None
    e = envelope.error
    if isinstance(e, _ErrorBody):
        return e.message or "no error message", e.param, str(e.code) if e.code is not None else None
    if isinstance(e, str):
        return e, None, None
    if envelope.detail is not None:
        return str(envelope.detail), None, None
    return envelope.message or "no error message", None, None


def _retry_after(headers: httpx.Headers) -> float | None:
    value = headers.get("retry-after")
    if value is not None:
        try:
            return max(0.0, float(value))
        except ValueError:
            try:
                when = email.utils.parsedate_to_datetime(value)
            except (TypeError, ValueError):
                return None
            return max(0.0, when.timestamp() - time.time())
    millis = headers.get("retry-after-ms")
    if millis is not None:
        try:
            return max(0.0, float(millis) / 1000.0)
        except ValueError:
            return None
    return None
