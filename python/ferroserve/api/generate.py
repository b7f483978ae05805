"""What chat and text completions share: parameter mapping, collecting a request's
events into choices, SSE framing, and cancellation when the client goes away."""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field

import msgspec

from ferroserve.backends.local import Collector, LocalChatModel
from ferroserve.errors import ApiError, from_engine, invalid
from ferroserve.schemas.chat import SamplingFields

_encode = msgspec.json.Encoder().encode
FINGERPRINT = "ferroserve-0.1.0"


def sampling_params(req: SamplingFields, *, max_tokens: int | None, logprobs: bool, top_logprobs: int) -> dict:
    """OpenAI fields -> engine keyword arguments (the engine validates ranges)."""
    stop = req.stop
    if isinstance(stop, str):
        stop = [stop]
    bias = None
    if req.logit_bias:
        try:
            bias = {int(k): float(v) for k, v in req.logit_bias.items()}
        except ValueError:
            raise invalid("logit_bias keys must be token ids.", param="logit_bias") from None
    params: dict = {
        "n": 1 if req.n is None else req.n,
        "max_tokens": max_tokens,
        "temperature": 1.0 if req.temperature is None else req.temperature,
        "top_p": 1.0 if req.top_p is None else req.top_p,
        "top_k": req.top_k or 0,
        "min_p": req.min_p or 0.0,
        "seed": req.seed,
        "presence_penalty": req.presence_penalty or 0.0,
        "frequency_penalty": req.frequency_penalty or 0.0,
        "logit_bias": bias,
        "stop": stop,
        "ignore_eos": req.ignore_eos,
        "logprobs": logprobs,
        "top_logprobs": top_logprobs,
    }
    if params["n"] < 1:
        raise invalid("n must be at least 1.", param="n")
    if max_tokens is not None and max_tokens < 1:
        raise invalid("max_tokens must be at least 1.", param="max_tokens")
    if req.seed is not None and not 0 <= req.seed < 2**64:
        params["seed"] = req.seed % 2**64
    if top_logprobs < 0:
        raise invalid("top_logprobs must be between 0 and 20.", param="top_logprobs")
    return params


@dataclass
class Choice:
    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[tuple] = field(default_factory=list)
    finish_reason: str | None = None
    completion_tokens: int = 0


@dataclass
class Outcome:
    choices: list[Choice]
    prompt_tokens: int
    cached_tokens: int = 0

    @property
    def completion_tokens(self) -> int:
        return sum(c.completion_tokens for c in self.choices)

    def usage(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
        }


def watch_disconnect(proto, collector: Collector) -> asyncio.Future | None:
    """Pushes an ('x',) event into the collector when the client goes away."""
    try:
        fut = asyncio.ensure_future(proto.client_disconnect())
    except Exception:  # an older RSGI protocol object without client_disconnect
        return None
    fut.add_done_callback(lambda f: None if f.cancelled() else collector.push(("x",)))
    return fut


def apply(outcome: Outcome, event: tuple) -> None:
    """Folds one engine event into the outcome; raises ApiError for an engine error."""
    kind = event[0]
    if kind == "d":
        c = outcome.choices[event[2]]
        c.text.append(event[3])
        c.token_ids.extend(event[4])
        if event[5]:
            c.logprobs.extend(event[5])
    elif kind == "f":
        c = outcome.choices[event[2]]
        c.finish_reason = event[3]
        c.completion_tokens = event[5]
        outcome.cached_tokens = event[6]
    elif kind == "a":
        outcome.cached_tokens = event[3]
    elif kind == "e":
        raise from_engine(event[2], event[3])


async def collect(model: LocalChatModel, request_id: int, collector: Collector, n: int, prompt_tokens: int, proto) -> Outcome:
    """Waits for all `n` choices (non-streaming). Aborts the request if the client leaves."""
    outcome = Outcome([Choice() for _ in range(n)], prompt_tokens)
    disconnect = watch_disconnect(proto, collector)
    finished = False
    try:
        while not finished:
            for event in await collector.next_batch():
                if event[0] == "x":
                    raise asyncio.CancelledError("client disconnected")
                apply(outcome, event)
            finished = all(c.finish_reason is not None for c in outcome.choices)
        return outcome
    finally:
        model.finish(request_id, abort=not finished)
        if disconnect is not None:
            disconnect.cancel()


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def sse(payload: bytes) -> bytes:
    return b"data: " + payload + b"\n\n"


SSE_HEADERS = [("content-type", "text/event-stream"), ("cache-control", "no-cache")]
DONE = b"data: [DONE]\n\n"


def now() -> int:
    return int(time.time())


def error_event(err: ApiError) -> bytes:
    return sse(err.body())


def encode(obj) -> bytes:
    return _encode(obj)
