"""The local backend: models run by the Rust engine in this process.

Each engine signals finished requests on a pipe fd; the event loop watches it and one
``drain()`` call hands every finished request of that wake-up to its waiting handler.
"""

from __future__ import annotations

import asyncio
import itertools
import os
from dataclasses import dataclass, field

from ferroserve import _core
from ferroserve.errors import ApiError, from_engine, from_engine_exception


@dataclass(slots=True)
class EmbeddingResult:
    data_json: bytes
    prompt_tokens: int


_request_ids = itertools.count(1)


class EngineWatcher:
    """Watches an engine's wake-up fd on the event loop; each wake-up drains every event
    of the engine's last step(s) at once and hands them to `_dispatch`."""

    engine: _core.EmbeddingEngine | _core.ChatEngine
    _loop: asyncio.AbstractEventLoop | None

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        fd = self.engine.fd()
        os.set_blocking(fd, False)
        loop.add_reader(fd, self._on_ready)

    def detach(self) -> None:
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


@dataclass
class LocalEmbeddingModel(EngineWatcher):
    """One loaded embedding model and its completion dispatcher."""

    name: str
    path: str
    engine: _core.EmbeddingEngine
    created: int
    _pending: dict[int, asyncio.Future] = field(default_factory=dict)
    _loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def load(
        cls, name: str, path: str, *, max_batch_tokens: int, max_wait_us: int, created: int,
        device: str = "cpu", kernel_binaries: str | None = None,
    ) -> LocalEmbeddingModel:
        engine = _core.EmbeddingEngine(
            path, max_batch_tokens=max_batch_tokens, max_wait_us=max_wait_us, device=device, kernel_binaries=kernel_binaries,
        )
        return cls(name=name, path=path, engine=engine, created=created)

    def _dispatch(self, events: list[tuple]) -> None:
        for event in events:
            fut = self._pending.pop(event[0], None)
            if fut is None or fut.done():
                continue  # the client went away
            if event[1]:
                fut.set_result(EmbeddingResult(event[2], event[3]))
            else:
                fut.set_exception(from_engine(event[2], event[3]))

    def count_tokens(self, texts: list[str] | None, token_lists: list[list[int]] | None) -> int:
        """The prompt tokens `embed` would charge, without running anything."""
        try:
            return self.engine.count_tokens(texts=texts, token_lists=token_lists)
        except _core.FerroserveError as exc:
            raise from_engine_exception(exc, param="input") from None

    async def embed(
        self,
        *,
        texts: list[str] | None,
        token_lists: list[list[int]] | None,
        dimensions: int | None,
        base64: bool,
    ) -> EmbeddingResult:
        assert self._loop is not None, "model not attached to the event loop"
        request_id = next(_request_ids)
        fut = self._loop.create_future()
        self._pending[request_id] = fut
        try:
            self.engine.submit(request_id, texts=texts, token_lists=token_lists, dimensions=dimensions, base64=base64)
        except _core.FerroserveError as exc:
            self._pending.pop(request_id, None)
            raise from_engine_exception(exc, param="dimensions" if "dimensions" in str(exc) else "input") from None
        try:
            return await fut
        finally:
            self._pending.pop(request_id, None)


class ModelNotReady(ApiError):
    def __init__(self, name: str) -> None:
        super().__init__(503, f"Model {name} is not loaded yet.", type="server_error", code="model_not_ready")


class Collector:
    """Events of one chat request, handed over by the dispatcher once per engine step."""

    __slots__ = ("events", "_wake", "wake_on_finish_only")

    def __init__(self, loop: asyncio.AbstractEventLoop, wake_on_finish_only: bool) -> None:
        self.events: list[tuple] = []
        self._wake = loop.create_future()
        self.wake_on_finish_only = wake_on_finish_only

    def push(self, event: tuple) -> None:
        self.events.append(event)
        if self.wake_on_finish_only and event[0] in ("a", "d"):
            return
        if not self._wake.done():
            self._wake.set_result(None)

    async def next_batch(self) -> list[tuple]:
        if not self.events or (self.wake_on_finish_only and all(e[0] in ("a", "d") for e in self.events)):
            await self._wake
        self._wake = asyncio.get_running_loop().create_future()
        batch, self.events = self.events, []
        return batch


@dataclass
class LocalChatModel(EngineWatcher):
    """One loaded GGUF chat model: submit, then per-request collectors fed by `drain()`."""

    name: str
    path: str
    engine: "_core.ChatEngine"
    created: int
    _collectors: dict[int, Collector] = field(default_factory=dict)
    _loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def load(
        cls, name: str, path: str, *, kv_budget_bytes: int, max_batch_tokens: int, max_running: int,
        chat_template: str | None, created: int, numerics: str = "exact",
        device: str = "cpu", kernel_binaries: str | None = None,
    ) -> LocalChatModel:
        engine = _core.ChatEngine(
            path, kv_budget_bytes=kv_budget_bytes, max_batch_tokens=max_batch_tokens,
            max_running=max_running, chat_template=chat_template, numerics=numerics,
            device=device, kernel_binaries=kernel_binaries,
        )
        return cls(name=name, path=path, engine=engine, created=created)

    def _dispatch(self, events: list[tuple]) -> None:
        collectors = self._collectors
        for event in events:
            c = collectors.get(event[1])
            if c is not None:
                c.push(event)

    def submit(self, prompt_tokens: list[int], params: dict, *, stream: bool) -> tuple[int, Collector, int, int]:
        """Queues a request; returns (request_id, collector, prompt_tokens, max_tokens)."""
        assert self._loop is not None, "model not attached to the event loop"
        request_id = next(_request_ids)
        collector = Collector(self._loop, wake_on_finish_only=not stream)
        self._collectors[request_id] = collector
        try:
            n_prompt, max_tokens = self.engine.submit(request_id, prompt_tokens, **params)
        except _core.FerroserveError as exc:
            self._collectors.pop(request_id, None)
            raise from_engine_exception(exc, param=_param_of(str(exc))) from None
        return request_id, collector, n_prompt, max_tokens

    def finish(self, request_id: int, *, abort: bool) -> None:
        """Forget the request; abort it in the engine if it may still be running."""
        self._collectors.pop(request_id, None)
        if abort:
            self.engine.abort(request_id)


_PARAMS = {
    "n", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "min_p", "seed",
    "presence_penalty", "frequency_penalty", "logit_bias", "stop", "logprobs", "top_logprobs",
    "prompt", "messages",
}


def _param_of(message: str) -> str | None:
    """Engine validation messages start with the parameter's name."""
    head = message.split(" ", 1)[0].strip("`'\":,")
    return head if head in _PARAMS else None
