"""The local backend: models run by the Rust engine in this process.

Each engine signals finished work on a pipe fd; the event loop watches it and one ``drain()``
call hands every event of that wake-up to the waiting requests. The engine's event tuples are
decoded here, once, into the typed events of ``backends.base``; nothing above this module
touches a Rust object.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import msgspec
import numpy as np

from ferroserve import _core
from ferroserve._core import ChatAdmitted, ChatDelta, ChatFinished, Embedded, EngineFailed
from ferroserve.backends.base import (
    DOWN, HEALTHY, Admitted, AtCapacity, Backend, BackendInfo, BackendStats, ChatRequest, Delta, EmbeddingResult,
    EmbedRequest, Event, Failed, Finished, Message, Tool, Unavailable, response_format_schema,
)
from ferroserve.backends.toolcalls import FORMATS, HERMES, ToolCallParser, lark_grammar
from ferroserve.config import ModelSpec
from ferroserve.errors import ApiError, engine_code, from_engine, from_engine_exception

_request_ids = itertools.count(1)
_encode_json = msgspec.json.Encoder().encode
# Engine error kinds that mean "cannot serve now" (another candidate may), not "bad request".
_UNAVAILABLE_KINDS = ("Overloaded", "EngineDead", "DeviceError")


def _failure(kind: str, message: str, param: str | None) -> ApiError | Unavailable:
    if kind == "Overloaded":
        return AtCapacity(f"{kind}: {message}")
    if kind in _UNAVAILABLE_KINDS:
        return Unavailable(f"{kind}: {message}", status=503, code=engine_code(kind))
    return from_engine(kind, message, param)


def _from_exception(exc: _core.FerroserveError, param: str | None) -> ApiError | Unavailable:
    kind = type(exc).__name__
    if kind in _UNAVAILABLE_KINDS:
        return _failure(kind, str(exc), None)
    return from_engine_exception(exc, param)


# Admission control (overload): each local model counts its interactive requests admitted and
# not yet finished, a few integer operations per request (never per token), and refuses new
# ones with `AtCapacity` (503 `capacity_unavailable`, `retry-after`) once its queue is full,
# at once, instead of letting them pile up in the engine. Batch-priority work is not bounded
# here: the engine runs it only on what interactive work leaves, and the batch runner bounds
# how much of it is in flight.
CAPACITY_RETRY_AFTER_S = 1.0


def default_max_queue(max_running: int) -> int:
    """Half a running batch may wait: at full load an admitted request then waits about half
    a request's time for its place, so its latency stays within 2x of what it is at capacity
    (issue 16's target; a whole batch waiting would sit right at 2x)."""
    return max(1, max_running // 2)


def interactive_request() -> _core.InteractiveRequest:
    """Counts a request as interactive on this process's engines from now until its
    `close()`: batch passes and steps wait meanwhile (`sched/interactive.rs`). The HTTP layer
    opens one when an inference request arrives, so batch work already gives way while the
    request is parsed, routed and tokenized, and while its answer is written."""
    return _core.InteractiveRequest()


def interactive_in_flight() -> int:
    """Interactive requests in flight on this process (HTTP layer and engines)."""
    return _core.InteractiveRequest.in_flight()


class EngineWatcher:
    """Watches an engine's wake-up fd on the event loop; each wake-up drains every event
    of the engine's last step(s) at once and hands them to `_dispatch`."""

    engine: _core.EmbeddingEngine | _core.ChatEngine
    _loop: asyncio.AbstractEventLoop | None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        fd = self.engine.fd()
        os.set_blocking(fd, False)
        loop.add_reader(fd, self._on_ready)

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.remove_reader(self.engine.fd())
            self._loop = None

    def _on_ready(self) -> None:
        try:
            os.read(self.engine.fd(), 4096)  # before drain(): see notify.rs
        except BlockingIOError:
            pass
        self._dispatch(self.engine.drain())

    def _dispatch(self, events: list[tuple]) -> None:
        raise NotImplementedError


@dataclass(eq=False)
class LocalEmbeddingModel(EngineWatcher, Backend):
    """One loaded embedding model and its completion dispatcher."""

    name: str
    path: str
    engine: _core.EmbeddingEngine
    spec: ModelSpec | None = None
    # Interactive requests in the engine (queued or in its batch) at most; see "Admission".
    max_queue: int = 1024
    _pending: dict[int, asyncio.Future] = field(default_factory=dict)
    _loop: asyncio.AbstractEventLoop | None = None
    _in_flight: int = 0
    _rejections: int = 0

    @classmethod
    def load(
        cls, name: str, path: str, *, max_batch_tokens: int, max_wait_us: int, batch_pass_tokens: int = 2048,
        batch_pass_tokens_busy: int = 16,
        device: str = "cpu", kernel_binaries: str | None = None, spec: ModelSpec | None = None, max_queue: int = 1024,
        numerics: str = "f32",
    ) -> LocalEmbeddingModel:
        engine = _core.EmbeddingEngine(
            path, max_batch_tokens=max_batch_tokens, max_wait_us=max_wait_us, device=device, kernel_binaries=kernel_binaries,
            batch_pass_tokens=batch_pass_tokens, batch_pass_tokens_busy=batch_pass_tokens_busy, numerics=numerics,
        )
        return cls(name=name, path=path, engine=engine, spec=spec, max_queue=max_queue)

    def engine_stats(self) -> dict:
        """Admission counters and the batcher's counters per priority, for /metrics."""
        return {"admission_in_flight": self._in_flight, "admission_waiting": self._in_flight,
                "admission_queue_limit": self.max_queue, "capacity_rejections": self._rejections,
                **self.engine.stats()}

    def info(self) -> BackendInfo:
        spec = self.spec
        return BackendInfo(
            kind="local", backend="local", capabilities=["embeddings"], context_length=self.engine.max_tokens,
            dimensions=self.engine.dim, device=self.engine.device,
            owned_by=spec.owned_by if spec else "ferroserve",
            input_usd_per_million_tokens=spec.input_usd_per_million_tokens if spec else 0.0,
            output_usd_per_million_tokens=spec.output_usd_per_million_tokens if spec else 0.0,
        )

    def _dispatch(self, events: list[Embedded | EngineFailed]) -> None:
        for event in events:
            fut = self._pending.pop(event.request_id, None)
            if fut is None or fut.done():
                continue  # the client went away
            if type(event) is Embedded:
                # A (rows, dim) float32 view of the engine's buffer (no copy).
                fut.set_result(EmbeddingResult(event.prompt_tokens, vectors=np.asarray(event.vectors)))
            else:
                fut.set_exception(_failure(event.kind, event.message, event.param))

    def at_capacity(self) -> AtCapacity | None:
        """The refusal a new interactive request gets now (counted), or None if it would be admitted."""
        if self._in_flight < self.max_queue:
            return None
        self._rejections += 1
        return AtCapacity(f"The model `{self.name}` is at capacity: {self._in_flight} requests are in its engine "
                          f"(the limit is {self.max_queue}). Please retry after {CAPACITY_RETRY_AFTER_S:g} s.",
                          CAPACITY_RETRY_AFTER_S)

    def count_embed_tokens(self, request: EmbedRequest) -> int:
        """The prompt tokens `embed` would charge, without running anything."""
        try:
            return self.engine.count_tokens(texts=request.texts, token_lists=request.token_lists)
        except _core.FerroserveError as exc:
            raise _from_exception(exc, "input") from None

    async def embed(self, request: EmbedRequest) -> EmbeddingResult:
        assert self._loop is not None, "model not attached to the event loop"
        interactive = request.priority == "interactive"
        rejected = self.at_capacity() if interactive else None
        if rejected is not None:
            raise rejected
        request_id = next(_request_ids)
        fut = self._loop.create_future()
        self._pending[request_id] = fut

        def submit() -> None:
            self.engine.submit(request_id, texts=request.texts, token_lists=request.token_lists,
                               dimensions=request.dimensions, priority=request.priority)

        try:
            if request.priority == "batch":
                # A batch chunk's tokenization (milliseconds for hundreds of inputs, GIL
                # released) runs off the event loop, which meanwhile serves interactive requests.
                await self._loop.run_in_executor(None, submit)
            else:
                submit()
        except _core.FerroserveError as exc:
            self._pending.pop(request_id, None)
            raise _from_exception(exc, "input") from None
        counted = 1 if interactive else 0
        self._in_flight += counted
        try:
            return await fut
        finally:
            self._in_flight -= counted
            self._pending.pop(request_id, None)


# Events that do not end a choice: a non-streaming request is not woken for them.
_PROGRESS = (ChatAdmitted, ChatDelta)


class Collector:
    """Events of one chat request, handed over by the dispatcher once per engine step."""

    __slots__ = ("events", "_wake", "wake_on_finish_only")

    def __init__(self, loop: asyncio.AbstractEventLoop, wake_on_finish_only: bool) -> None:
        self.events: list = []
        self._wake = loop.create_future()
        self.wake_on_finish_only = wake_on_finish_only

    def push(self, event) -> None:
        self.events.append(event)
        if self.wake_on_finish_only and type(event) in _PROGRESS:
            return
        if not self._wake.done():
            self._wake.set_result(None)

    async def next_batch(self) -> list:
        if not self.events or (self.wake_on_finish_only and all(type(e) in _PROGRESS for e in self.events)):
            await self._wake
        self._wake = asyncio.get_running_loop().create_future()
        batch, self.events = self.events, []
        return batch


@dataclass(eq=False)
class LocalChatModel(EngineWatcher, Backend):
    """One loaded GGUF chat model: submit, then per-request collectors fed by `drain()`."""

    name: str
    path: str
    engine: "_core.ChatEngine"
    spec: ModelSpec | None = None
    # Admission (see above): the engine's running batch, and the sequences that may wait for a
    # place in it.
    max_running: int = 64
    max_queue: int = 32
    _collectors: dict[int, Collector] = field(default_factory=dict)
    _loop: asyncio.AbstractEventLoop | None = None
    _rate: tuple[float, int, float] = (0.0, 0, 0.0)  # (monotonic time, generated tokens, tokens/s)
    _in_flight: int = 0  # sequences (n per request) of interactive requests submitted, not finished
    _batch_in_flight: int = 0  # the same for batch-priority requests
    # Places held by requests that found room at arrival and whose body is being read
    # (api/admission.py's Place): counted as waiting, so arrivals meanwhile see them.
    reserved: int = 0
    _rejections: int = 0
    can_resume = True

    @classmethod
    def load(
        cls, name: str, path: str, *, kv_budget_bytes: int, max_batch_tokens: int, max_running: int,
        chat_template: str | None, burst_batch_tokens: int = 512, numerics: str = "exact",
        device: str = "cpu", kernel_binaries: str | None = None, spec: ModelSpec | None = None,
        max_queue: int | None = None,
    ) -> LocalChatModel:
        engine = _core.ChatEngine(
            path, kv_budget_bytes=kv_budget_bytes, max_batch_tokens=max_batch_tokens,
            burst_batch_tokens=burst_batch_tokens, max_running=max_running, chat_template=chat_template, numerics=numerics,
            device=device, kernel_binaries=kernel_binaries,
        )
        return cls(name=name, path=path, engine=engine, spec=spec, max_running=max_running,
                   max_queue=default_max_queue(max_running) if max_queue is None else max_queue)

    @property
    def tool_format(self):
        """The call format the model's prompt asks for (its template's, or our Hermes lowering)."""
        return FORMATS.get(self.engine.tool_format or "hermes", HERMES)

    def info(self) -> BackendInfo:
        spec = self.spec
        return BackendInfo(
            kind="local", backend="local", capabilities=["chat", "completions"], context_length=self.engine.context_length,
            device=self.engine.device, owned_by=spec.owned_by if spec else "ferroserve",
            input_usd_per_million_tokens=spec.input_usd_per_million_tokens if spec else 0.0,
            output_usd_per_million_tokens=spec.output_usd_per_million_tokens if spec else 0.0,
        )

    def health(self) -> str:
        # A chat engine whose thread died reports alive=False (and fails requests with 503).
        return HEALTHY if self.engine.alive else DOWN

    def fault(self) -> str | None:
        if self.engine.alive:
            return None
        return self.engine.failure or "the engine thread stopped"

    def waiting(self) -> int:
        """Sequences of interactive requests waiting for a place in the running batch, as
        admission counts them: those admitted (or holding a place while their body is read)
        beyond the batch's `max_running`, or, when the
        KV budget lets the engine run fewer (its blocks are taken; it preempts), the sequences
        the engine reports waiting. Batch-priority sequences are subtracted from the latter
        (they wait behind interactive work by design); the engine's count is as of its last
        step, which only errs towards waiting more."""
        over = self._in_flight + self.reserved - self.max_running
        if over >= self.max_queue:
            return over
        return max(over, self.engine.stats()["waiting_sequences"] - self._batch_in_flight, 0)

    def at_capacity(self) -> AtCapacity | None:
        """The refusal a new interactive request gets now (counted), or None if it would be admitted."""
        waiting = self.waiting()
        if waiting < self.max_queue:
            return None
        self._rejections += 1
        return AtCapacity(f"The model `{self.name}` is at capacity: {waiting} requests are waiting for its engine "
                          f"(the limit is {self.max_queue}). Please retry after {CAPACITY_RETRY_AFTER_S:g} s.",
                          CAPACITY_RETRY_AFTER_S)

    def stats(self) -> BackendStats:
        s = self.engine.stats()
        # Live decode rate: generated tokens per second since the previous reading at least a
        # second ago (the engine counts; this only differences two readings).
        now = time.monotonic()
        t0, n0, rate = self._rate
        if now - t0 >= 1.0:
            rate = (s["generated_tokens"] - n0) / (now - t0)
            self._rate = (now, s["generated_tokens"], rate)
        return BackendStats(queue_depth=int(s["waiting_sequences"]), running=int(s["running_sequences"]),
                            kv_usage=s["kv_usage"], decode_tokens_per_s=rate)

    def engine_stats(self) -> dict:
        """The engine's own counters and admission's, for /metrics."""
        stats = self.engine.stats()
        stats.update(admission_in_flight=self._in_flight, admission_reserved=self.reserved, admission_waiting=self.waiting(),
                     admission_queue_limit=self.max_queue, capacity_rejections=self._rejections)
        return stats

    # The tokenizer, for /v1/tokenize and /v1/detokenize (engine errors become 400s).
    def tokenizer(self) -> LocalChatModel:
        return self

    @property
    def vocab_size(self) -> int:
        return self.engine.vocab_size

    def encode_text(self, text: str, add_special: bool, param: str = "prompt") -> list[int]:
        try:
            return self.engine.encode(text, add_special, True)
        except _core.FerroserveError as exc:
            raise from_engine_exception(exc, param=param) from None

    def encode_messages(self, messages: list[Message], add_generation_prompt: bool,
                        tools: list[Tool] | None = None) -> list[int]:
        rows = [
            (m.role, m.content) if m.tool_calls is None and m.tool_call_id is None
            else (m.role, m.content, [(c.id, c.name, c.arguments) for c in m.tool_calls or ()], m.tool_call_id)
            for m in messages
        ]
        specs = [(t.name, t.description, _encode_json(t.parameters).decode()) for t in tools] if tools else None
        try:
            return self.engine.encode_chat(rows, add_generation_prompt, specs)
        except _core.FerroserveError as exc:
            raise from_engine_exception(exc, param="messages") from None

    def decode_ids(self, ids: list[int]) -> str:
        try:
            return self.engine.decode(ids, False)
        except _core.FerroserveError as exc:
            raise from_engine_exception(exc, param="tokens") from None

    def _dispatch(self, events: list) -> None:
        collectors = self._collectors
        for event in events:
            c = collectors.get(event.request_id)
            if c is not None:
                c.push(event)

    def prompt_tokens(self, request: ChatRequest) -> list[int]:
        """The request's prompt as token ids (templated and tokenized once; memoised)."""
        memo = request.memo
        tokens = memo.get(self.name)  # keyed by model: two local models may tokenize differently
        if tokens is not None:
            return tokens
        if request.messages is not None:
            tokens = self.encode_messages(request.messages, True, request.tools)
        elif isinstance(request.prompt, str):
            tokens = self.encode_text(request.prompt, True)
        else:
            tokens = list(request.prompt or [])
        if request.resume:
            # Continue an answer another candidate started: its text follows the prompt (and
            # is not counted as prompt tokens).
            sent = self.encode_text(request.resume, False)
            memo[self.name + ":resumed"] = len(sent)
            tokens = tokens + sent
        memo[self.name] = tokens
        return tokens

    def count_tokens(self, request: ChatRequest) -> int:
        return len(self.prompt_tokens(request))

    async def generate(self, request: ChatRequest) -> AsyncIterator[Event]:
        assert self._loop is not None, "model not attached to the event loop"
        interactive = request.priority == "interactive"
        # First, so a refusal costs no grammar or tokenizing; nothing below awaits before the
        # submit counts the request, so concurrent requests cannot slip past the bound together.
        rejected = self.at_capacity() if interactive else None
        if rejected is not None:
            yield Failed(rejected)
            return
        if request.resume and (request.params.response_format is not None or request.tools):
            # The grammar would start a new document after the text already sent.
            yield Failed(Unavailable("a constrained answer cannot be resumed on another model"))
            return
        params = request.params
        json_schema = lark = None
        if request.tools:
            # Tool calls: one grammar for calls (and, under auto, the text alternative).
            text_schema = None
            if params.response_format is not None:
                text_schema = msgspec.json.decode(response_format_schema(params.response_format))
            try:
                lark = lark_grammar(request.tools, request.tool_choice, request.tool_choice_function,
                                    request.parallel_tool_calls, text_schema, self.tool_format)
            except ApiError as err:
                yield Failed(err)
                return
        elif params.response_format is not None:
            json_schema = response_format_schema(params.response_format)
        try:
            prompt = self.prompt_tokens(request)
        except ApiError as err:
            yield Failed(err)
            return
        request_id = next(_request_ids)
        collector = Collector(self._loop, wake_on_finish_only=not request.stream)
        self._collectors[request_id] = collector
        try:
            self.engine.submit(
                request_id, prompt, n=params.n, max_tokens=params.max_tokens, temperature=params.temperature,
                top_p=params.top_p, top_k=params.top_k, min_p=params.min_p, seed=params.seed,
                presence_penalty=params.presence_penalty, frequency_penalty=params.frequency_penalty,
                logit_bias=params.logit_bias, stop=params.stop, ignore_eos=params.ignore_eos,
                logprobs=params.logprobs, top_logprobs=params.top_logprobs,
                json_schema=json_schema, lark_grammar=lark, priority=request.priority,
                # An answer sent whole needs its text only at the end: the engine keeps it
                # and sends one event per choice, so no Python runs per token.
                coalesce=not request.stream,
            )
        except _core.FerroserveError as exc:
            self._collectors.pop(request_id, None)
            fault = self.fault()  # a stopped engine refuses with a bare EngineDead: say why it stopped
            yield Failed(_failure("EngineDead", fault, None) if fault is not None else _from_exception(exc, None))
            return
        if interactive:
            self._in_flight += params.n
        else:
            self._batch_in_flight += params.n
        remaining = params.n
        resumed = request.memo.get(self.name + ":resumed", 0)
        # With tools, each choice's text goes through its parser: text, or tool-call deltas.
        parsers = [ToolCallParser(i, self.tool_format) for i in range(params.n)] if request.tools else None
        try:
            while remaining:
                for e in await collector.next_batch():
                    kind = type(e)
                    if kind is ChatDelta:
                        if parsers is None:
                            yield Delta(e.index, e.text, e.token_ids, e.logprobs)
                            continue
                        # Token ids and logprobs ride on the choice's next event (text or
                        # tool call); an event-less step still reports them.
                        pieces = parsers[e.index].feed(e.text)
                        if not pieces:
                            yield Delta(e.index, "", e.token_ids, e.logprobs)
                        for k, piece in enumerate(pieces):
                            if isinstance(piece, str):
                                yield Delta(e.index, piece, e.token_ids if k == 0 else [], e.logprobs if k == 0 else None)
                            else:
                                if k == 0:
                                    yield Delta(e.index, "", e.token_ids, e.logprobs)
                                yield piece
                    elif kind is ChatFinished:
                        remaining -= 1
                        reason = e.finish_reason
                        if parsers is not None:
                            parser = parsers[e.index]
                            for text in parser.finish():
                                yield Delta(e.index, text)
                            if parser.answered_with_calls and reason == "stop":
                                reason = "tool_calls"
                        yield Finished(e.index, reason, e.completion_tokens, e.prompt_tokens - resumed, e.cached_tokens)
                    elif kind is ChatAdmitted:
                        yield Admitted(e.prompt_tokens - resumed, e.cached_tokens)
                    else:  # EngineFailed
                        remaining = 0
                        yield Failed(_failure(e.kind, e.message, e.param))
                        return
        finally:
            # Forget the request; abort it in the engine if it may still be running (the
            # consumer stopped iterating: the client went away, or a fallback took over).
            self._collectors.pop(request_id, None)
            if interactive:
                self._in_flight -= params.n
            else:
                self._batch_in_flight -= params.n
            if remaining:
                self.engine.abort(request_id)
