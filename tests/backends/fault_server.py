"""A small, real HTTP/1.1 server speaking just enough OpenAI, whose failures tests choose.

It runs its own asyncio loop in a daemon thread on a free loopback port; keep-alive and SSE
(chunked transfer encoding) work as with a real upstream. Use ::

    with FaultServer() as upstream:                 # or FaultServer().start() ... .stop()
        upstream.base_url                           # "http://127.0.0.1:PORT/v1"
        upstream.mode = "500"
        ...
        assert upstream.wait_for(lambda: upstream.cancelled >= 1)

Endpoints: POST /v1/chat/completions and /v1/completions (streaming SSE when `stream` is true,
n choices, logprobs in the chat or completions shape, a usage chunk when
`stream_options.include_usage`, `[DONE]`; a JSON answer otherwise), POST /v1/embeddings
(deterministic vectors from a hash of each input, `encoding_format` float or base64,
`dimensions`), GET /v1/models. Any model name is accepted. Request bodies need Content-Length.

Behaviour, settable at any time from the test's thread:

    mode             what the next requests get (default "ok"):
        "ok"                 a correct answer at once
        "slow"               a correct answer, `prefill_delay_s` before the first token and
                             `token_delay_s` between tokens (latency-aware routing tests)
        "500", "429", "400", "401", "408", ... (any status as a string)
                             that status with an OpenAI error body; 429 and 503 carry
                             `Retry-After: <retry_after>` when `retry_after` is not None;
                             400 names param "temperature" and code "invalid_value"
        "hang"               reads the request, never answers (until the client leaves)
        "hang_after_headers" sends 200 and SSE headers, then nothing
        "hang_mid_stream"    sends the first delta, then nothing
        "close"              closes the connection without answering
    script           a list of modes used first, one per request, before `mode` (e.g.
                     `["500", "500"]` fails the next two requests only)
    tokens           the streamed text pieces (default ["Hello", ",", " world", "!"]); each is
                     one token; `max_tokens` cuts them (finish_reason "length")
    token_delay_s    0.05; prefill_delay_s 0.0 (slow mode only)
    prompt_tokens    the usage's prompt_tokens (default 7); cached_tokens (default 0)
    retry_after      the Retry-After value for 429/503 (default "2"; None: no header)
    embedding_dim    vector size when `dimensions` is not given (default 8)
    keep_alive       False: close each connection after its response without saying so
                     (an upstream's idle timeout, as the client sees it; default True)

What happened (read from the test's thread):

    requests         list of Recorded(method, path, headers (lower-case), json, mode)
    count(path=None) requests so far (to one path, e.g. "/v1/chat/completions")
    cancelled        responses the client abandoned (closed the connection) before their end
    completed        responses sent to their end
    active           responses being sent now
    connections      TCP connections accepted (keep-alive reuse keeps this low)
    wait_for(pred, timeout_s=5.0) -> bool   polls `pred()` (the server notices a closed
                     connection asynchronously)
    reset()          clears the records and restores the default behaviour
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import struct
import threading
import time
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, Callable

DEFAULT_TOKENS = ["Hello", ",", " world", "!"]


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    json: Any
    mode: str


class _ClientGone(Exception):
    pass


@dataclass
class FaultServer:
    host: str = "127.0.0.1"
    port: int = 0
    mode: str = "ok"
    script: list[str] = field(default_factory=list)
    tokens: list[str] = field(default_factory=lambda: list(DEFAULT_TOKENS))
    token_delay_s: float = 0.05
    prefill_delay_s: float = 0.0
    prompt_tokens: int = 7
    cached_tokens: int = 0
    retry_after: str | None = "2"
    embedding_dim: int = 8
    keep_alive: bool = True
    requests: list[Recorded] = field(default_factory=list)
    cancelled: int = 0
    completed: int = 0
    active: int = 0
    connections: int = 0

    def __post_init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._thread: threading.Thread | None = None
        self._tasks: set[asyncio.Task] = set()

    # Life cycle ------------------------------------------------------------------------------
    def start(self) -> FaultServer:
        ready = threading.Event()

        def run() -> None:
            loop = self._loop = asyncio.new_event_loop()
            self._server = loop.run_until_complete(asyncio.start_server(self._connection, self.host, self.port))
            self.port = self._server.sockets[0].getsockname()[1]
            ready.set()
            loop.run_forever()
            loop.close()

        self._thread = threading.Thread(target=run, name="fault-server", daemon=True)
        self._thread.start()
        ready.wait(10)
        return self

    def stop(self) -> None:
        loop = self._loop
        if loop is None:
            return

        async def shutdown() -> None:
            self._server.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(shutdown(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        self._thread.join(10)
        self._loop = None

    def __enter__(self) -> FaultServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    # Test helpers ----------------------------------------------------------------------------
    def count(self, path: str | None = None) -> int:
        return sum(1 for r in self.requests if path is None or r.path == path)

    def wait_for(self, predicate: Callable[[], bool], timeout_s: float = 5.0) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if predicate():
                return True
            time.sleep(0.005)
        return predicate()

    def reset(self) -> None:
        self.mode, self.script, self.tokens = "ok", [], list(DEFAULT_TOKENS)
        self.token_delay_s, self.prefill_delay_s, self.retry_after = 0.05, 0.0, "2"
        self.prompt_tokens, self.cached_tokens, self.embedding_dim, self.keep_alive = 7, 0, 8, True
        self.requests = []
        self.cancelled = self.completed = self.connections = 0

    # HTTP ------------------------------------------------------------------------------------
    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._tasks.add(task)
        self.connections += 1
        try:
            while True:
                request_line = await reader.readline()
                if not request_line:
                    return
                method, path, _ = request_line.decode("latin-1").split(" ", 2)
                headers: dict[str, str] = {}
                while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
                    name, _, value = line.decode("latin-1").partition(":")
                    headers[name.strip().lower()] = value.strip()
                size = int(headers.get("content-length", "0"))
                body = await reader.readexactly(size) if size else b""
                mode = self.script.pop(0) if self.script else self.mode
                payload = json.loads(body) if body else None
                self.requests.append(Recorded(method, path, headers, payload, mode))
                self.active += 1
                try:
                    keep = await self._respond(reader, writer, method, path, payload, mode)
                    self.completed += 1
                except (_ClientGone, ConnectionError):
                    self.cancelled += 1
                    return
                finally:
                    self.active -= 1
                if not (keep and self.keep_alive) or headers.get("connection", "").lower() == "close":
                    return
        except (asyncio.IncompleteReadError, ConnectionError, ValueError):
            return
        except asyncio.CancelledError:
            pass
        finally:
            self._tasks.discard(task)
            writer.close()

    async def _respond(self, reader, writer, method: str, path: str, body: Any, mode: str) -> bool:
        """Answers one request; False to close the connection afterwards."""
        watch = _Watch(reader)
        try:
            if mode == "close":
                return False
            if mode == "hang":
                await watch.sleep(3600)
            if mode.isdigit():
                self._error(writer, int(mode))
            elif method == "GET" and path == "/v1/models":
                _json(writer, 200, {"object": "list", "data": [
                    {"id": "fault-chat", "object": "model", "created": 0, "owned_by": "fault"},
                    {"id": "fault-embed", "object": "model", "created": 0, "owned_by": "fault"}]})
            elif method == "POST" and path == "/v1/embeddings":
                _json(writer, 200, self._embeddings(body))
            elif method == "POST" and path in ("/v1/chat/completions", "/v1/completions"):
                await self._generate(writer, watch, body, mode, chat=path.endswith("chat/completions"))
            else:
                _json(writer, 404, {"error": {"message": f"no route {method} {path}", "type": "invalid_request_error"}})
            await writer.drain()
            return True
        finally:
            watch.cancel()

    def _error(self, writer, status: int) -> None:
        kind = "server_error" if status >= 500 else "invalid_request_error"
        error = {"message": f"fault server: {HTTPStatus(status).phrase}", "type": kind, "param": None, "code": None}
        if status == 400:
            error.update(param="temperature", code="invalid_value")
        headers = [("Retry-After", self.retry_after)] if status in (429, 503) and self.retry_after is not None else []
        _json(writer, status, {"error": error}, headers)

    def _embeddings(self, body: dict) -> dict:
        inputs = body["input"]
        if isinstance(inputs, str) or (inputs and isinstance(inputs[0], int)):
            inputs = [inputs]
        dim = body.get("dimensions") or self.embedding_dim
        data = []
        for i, item in enumerate(inputs):
            seed = hashlib.sha256(json.dumps(item).encode()).digest()
            values = [((seed[j % 32] + 7 * j) % 251) / 125.0 - 1.0 for j in range(dim)]
            raw = struct.pack(f"<{dim}f", *values)
            emb = base64.b64encode(raw).decode() if body.get("encoding_format") == "base64" else list(struct.unpack(f"<{dim}f", raw))
            data.append({"object": "embedding", "index": i, "embedding": emb})
        tokens = sum(len(x) if isinstance(x, list) else max(1, len(x) // 4) for x in inputs)
        return {"object": "list", "model": body.get("model"), "data": data,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    async def _generate(self, writer, watch: _Watch, body: dict, mode: str, chat: bool) -> None:
        n = body.get("n") or 1
        tokens = self.tokens[: body["max_tokens"]] if body.get("max_tokens") is not None else self.tokens
        reason = "length" if len(tokens) < len(self.tokens) else "stop"
        logprobs = body.get("logprobs")
        usage = {"prompt_tokens": self.prompt_tokens, "completion_tokens": n * len(tokens),
                 "total_tokens": self.prompt_tokens + n * len(tokens),
                 "prompt_tokens_details": {"cached_tokens": self.cached_tokens}}
        kind = "chat.completion" if chat else "text_completion"
        head = {"id": "fault-1", "created": 0, "model": body.get("model")}
        if not body.get("stream"):
            # A buffered answer takes as long as the stream would have, and hangs as it would.
            if mode in ("hang_after_headers", "hang_mid_stream"):
                await watch.sleep(3600)
            if mode == "slow":
                await watch.sleep(self.prefill_delay_s + self.token_delay_s * max(len(tokens) - 1, 0))
            choices = []
            for i in range(n):
                text = "".join(tokens)
                choices.append({"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": reason}
                               if chat else {"index": i, "text": text, "finish_reason": reason})
            _json(writer, 200, {**head, "object": kind, "choices": choices, "usage": usage})
            return
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
                     b"transfer-encoding: chunked\r\n\r\n")
        await writer.drain()
        if mode == "hang_after_headers":
            await watch.sleep(3600)
        slow = mode == "slow"
        if slow and self.prefill_delay_s:
            await watch.sleep(self.prefill_delay_s)
        obj = kind + ".chunk" if chat else kind

        async def event(choices: list, usage_value: Any = None) -> None:
            chunk = {**head, "object": obj, "choices": choices}
            if body.get("stream_options", {}).get("include_usage"):
                chunk["usage"] = usage_value
            data = b"data: " + json.dumps(chunk).encode() + b"\n\n"
            writer.write(b"%x\r\n%s\r\n" % (len(data), data))
            await writer.drain()
            if watch.gone():
                raise _ClientGone

        for t, token in enumerate(tokens):
            if t and slow:
                await watch.sleep(self.token_delay_s)
            for i in range(n):
                if chat:
                    choice = {"index": i, "delta": {"content": token}, "logprobs": None, "finish_reason": None}
                    if logprobs:
                        choice["logprobs"] = {"content": [{
                            "token": token, "logprob": -0.5, "bytes": list(token.encode()),
                            "top_logprobs": [{"token": token, "logprob": -0.5, "bytes": list(token.encode())}][: body.get("top_logprobs") or 0]}]}
                else:
                    choice = {"index": i, "text": token, "logprobs": None, "finish_reason": None}
                    if logprobs is not None:
                        choice["logprobs"] = {"tokens": [token], "token_logprobs": [-0.5],
                                              "top_logprobs": [{token: -0.5}] if logprobs else None, "text_offset": [0]}
                await event([choice])
            if mode == "hang_mid_stream":
                await watch.sleep(3600)
        for i in range(n):
            await event([{"index": i, "delta": {}, "finish_reason": reason} if chat
                         else {"index": i, "text": "", "finish_reason": reason}])
        if body.get("stream_options", {}).get("include_usage"):
            await event([], usage)
        done = b"data: [DONE]\n\n"
        writer.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(done), done))


class _Watch:
    """Notices the client closing the connection while a response is being produced, without
    reading from it (the reader sees EOF or an error as soon as the peer closes)."""

    def __init__(self, reader: asyncio.StreamReader) -> None:
        self.reader = reader

    def gone(self) -> bool:
        return self.reader.at_eof() or self.reader.exception() is not None

    async def sleep(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while True:
            if self.gone():
                raise _ClientGone
            left = deadline - time.monotonic()
            if left <= 0:
                return
            await asyncio.sleep(min(left, 0.005))

    def cancel(self) -> None:
        pass


def _json(writer, status: int, payload: Any, headers: list[tuple[str, str]] = ()) -> None:
    body = json.dumps(payload).encode()
    head = f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers)
    writer.write(head.encode() + b"\r\n" + body)
