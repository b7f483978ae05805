"""What chat and text completions share: parameter mapping, routing a generation to a
candidate, folding its events into choices, SSE framing, and cancellation when the client
goes away."""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import msgspec
from granian.rsgi import ProtocolClosed  # what a read or write raises once the client left

from ferroserve.backends.base import Admitted, ChatRequest, Delta, Failed, Finished, SamplingParams, Unavailable
from ferroserve.errors import ApiError, invalid
from ferroserve.gateway.gate import Ticket
from ferroserve.gateway.router import Plan, Router
from ferroserve.schemas.chat import SamplingFields

_encode = msgspec.json.Encoder().encode
FINGERPRINT = "ferroserve-0.1.0"


def response_format_of(value: Any) -> dict[str, Any] | None:
    """OpenAI's `response_format`, checked: None for free text (absent or `text`), else
    `{"type": "json_object"}` or `{"type": "json_schema", "json_schema": {name, schema, strict}}`.
    Anything else is a 400, never silently ignored. Whether the schema can be enforced is the
    backend's answer (the engine names the feature it cannot)."""
    if value is None:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("type"), str):
        raise invalid("response_format must be an object with a `type`.", param="response_format")
    kind = value["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind != "json_schema":
        raise invalid(f"response_format type {kind!r} is not supported: use 'text', 'json_object' or 'json_schema'.",
                      param="response_format")
    spec = value.get("json_schema")
    if not isinstance(spec, dict):
        raise invalid("response_format of type 'json_schema' needs a `json_schema` object.", param="response_format")
    name = spec.get("name")
    if not isinstance(name, str) or not name:
        raise invalid("response_format.json_schema.name is required.", param="response_format")
    schema = spec.get("schema", {})
    if not isinstance(schema, (dict, bool)):
        raise invalid("response_format.json_schema.schema must be a JSON schema object.", param="response_format")
    strict = spec.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise invalid("response_format.json_schema.strict must be a boolean.", param="response_format")
    return {"type": "json_schema", "json_schema": value["json_schema"]}


# The engine takes counts and token ids as unsigned 32-bit (or wider) integers; JSON integers
# are unbounded. A value past that is the client's error (400), not an overflow in the binding.
U32_MAX = 2**32 - 1
MAX_CHOICES = 128


def check_u32(value: int, param: str) -> int:
    if value > U32_MAX:
        raise invalid(f"{param} is {value}, larger than this server accepts ({U32_MAX}).", param=param)
    return value


def max_tokens_of(router: Router, requested: int | None, param: str, default: int | None = None) -> int | None:
    """A request's max_tokens under the operator's `--default-max-tokens` and
    `--max-tokens-limit`: absent, the route's own `default` (16 for text completions), else the
    server's default, else the limit (else None: to the end of the context); above the limit,
    a 400."""
    settings = router.settings
    limit = settings.max_tokens_limit
    if requested is None:
        requested = default if default is not None else settings.default_max_tokens
        return min(requested, limit) if requested is not None and limit is not None else (requested or limit)
    if requested < 1:
        raise invalid(f"{param} must be at least 1.", param=param)
    check_u32(requested, param)
    if limit is not None and requested > limit:
        raise invalid(f"{param} is {requested}; this server generates at most {limit} tokens per request.", param=param)
    return requested


def sampling_params(req: SamplingFields, *, max_tokens: int | None, logprobs: bool, top_logprobs: int) -> SamplingParams:
    """OpenAI fields -> the backends' sampling parameters (the engine validates ranges)."""
    stop = req.stop
    if isinstance(stop, str):
        stop = [stop]
    bias = None
    if req.logit_bias:
        try:
            bias = {int(k): float(v) for k, v in req.logit_bias.items()}
        except ValueError:
            raise invalid("logit_bias keys must be token ids.", param="logit_bias") from None
        if not all(0 <= k <= U32_MAX for k in bias):
            raise invalid("logit_bias keys must be token ids.", param="logit_bias")
    n = 1 if req.n is None else req.n
    # OpenAI's own bound; a backend may allow fewer (the engine: 16). Checked here because the
    # handlers size per-choice state by n before a backend sees it.
    if not 1 <= n <= MAX_CHOICES:
        raise invalid(f"n must be between 1 and {MAX_CHOICES}.", param="n")
    if max_tokens is not None and max_tokens < 1:
        raise invalid("max_tokens must be at least 1.", param="max_tokens")
    if not 0 <= top_logprobs <= 20:
        raise invalid("top_logprobs must be between 0 and 20.", param="top_logprobs")
    # vLLM's clients send -1 for "all tokens" (our 0); a top_k past the vocabulary is all
    # tokens too.
    top_k = req.top_k or 0
    if top_k < -1:
        raise invalid("top_k must be -1 or 0 (all tokens) or a positive number of tokens.", param="top_k")
    top_k = min(max(top_k, 0), U32_MAX)
    seed = req.seed
    if seed is not None and not 0 <= seed < 2**64:
        seed %= 2**64
    return SamplingParams(
        n=n, max_tokens=max_tokens,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=top_k, min_p=req.min_p or 0.0, seed=seed,
        presence_penalty=req.presence_penalty or 0.0, frequency_penalty=req.frequency_penalty or 0.0,
        logit_bias=bias, stop=stop, ignore_eos=req.ignore_eos, logprobs=logprobs, top_logprobs=top_logprobs,
        response_format=response_format_of(getattr(req, "response_format", None)),
    )


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

    @property
    def generated_tokens(self) -> int:
        """What was generated so far (metered even when the client left early)."""
        return sum(c.completion_tokens if c.finish_reason is not None else max(len(c.token_ids), len(c.text))
                   for c in self.choices)

    @property
    def finished(self) -> bool:
        return all(c.finish_reason is not None for c in self.choices)

    def usage(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
        }


def apply(outcome: Outcome, event) -> None:
    """Folds one backend event into the outcome; raises ApiError for a failure."""
    t = type(event)
    if t is Delta:
        c = outcome.choices[event.index]
        c.text.append(event.text)
        c.token_ids.extend(event.token_ids)
        if event.logprobs:
            c.logprobs.extend(event.logprobs)
    elif t is Finished:
        c = outcome.choices[event.index]
        c.finish_reason = event.reason
        c.completion_tokens = event.completion_tokens
        if event.prompt_tokens:
            outcome.prompt_tokens = event.prompt_tokens
        outcome.cached_tokens = event.cached_tokens
    elif t is Admitted:
        outcome.prompt_tokens = event.prompt_tokens
        outcome.cached_tokens = event.cached_tokens
    elif t is Failed:
        raise failure_error(event.error)


def failure_error(error) -> ApiError:
    """A backend failure the client sees: its ApiError, or a 503 for a backend that stopped
    serving after the response was committed."""
    if isinstance(error, ApiError):
        return error
    if isinstance(error, Unavailable):
        return ApiError(503, f"The backend stopped serving this request: {error.reason}", type="server_error",
                        code=error.code or "backend_unavailable")
    return ApiError(500, "The server had an error while processing your request.", type="server_error")


class Disconnect:
    """Cancels the handler's task when the client goes away (the backend's generation is
    then closed, which aborts it). `fired` tells the handler why it was cancelled."""

    __slots__ = ("task", "fired", "fut")

    def __init__(self, proto) -> None:
        self.task = asyncio.current_task()
        self.fired = False
        try:
            self.fut = asyncio.ensure_future(proto.client_disconnect())
        except Exception:  # an RSGI protocol object without client_disconnect
            self.fut = None
            return
        self.fut.add_done_callback(self._on_disconnect)

    def _on_disconnect(self, fut: asyncio.Future) -> None:
        # `self.fut` is None once closed: a callback scheduled just before `close` (the client
        # left as the handler finished) must not cancel the task after the block.
        if not fut.cancelled() and self.fut is not None and self.task is not None:
            self.fired = True
            self.task.cancel()

    def close(self) -> None:
        if self.fut is not None:
            self.fut.remove_done_callback(self._on_disconnect)
            self.fut.cancel()
            self.fut = None

    def absorb(self) -> bool:
        """Inside `except CancelledError`: True if the cancellation was the client leaving
        (then it is absorbed), False if it must propagate."""
        if self.fired and self.task is not None:
            self.task.uncancel()
            return True
        return False

    # `with Disconnect(proto):` around a handler's work: the watcher is closed on the way out,
    # and a cancellation caused by the client leaving is absorbed (the code after the block
    # then answers 499 for the log); any other cancellation propagates.
    def __enter__(self) -> Disconnect:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.close()
        return exc_type is not None and issubclass(exc_type, asyncio.CancelledError) and self.absorb()


# The message of the cancellation that cuts a request still running when the shutdown timeout
# runs out (App._cut_in_flight).
SHUTDOWN = "server shutting down"


def cut_by_shutdown(exc: asyncio.CancelledError) -> bool:
    return bool(exc.args) and exc.args[0] == SHUTDOWN


def shutdown_error() -> ApiError:
    return ApiError(503, "The server is shutting down; retry the request.", type="server_error", code="server_shutting_down")


async def end_cut_stream(transport, last: bytes, log: dict) -> None:
    """Inside `except CancelledError` of a stream the shutdown cut: the cancellation is absorbed
    (the handler returns and its usage is recorded as for a client that left), and the client
    is told with `last` (an error event) instead of a stream that just stops."""
    task = asyncio.current_task()
    if task is not None:
        task.uncancel()
    log["shutdown_cut"] = True
    try:
        await transport.send_bytes(last)
    except ProtocolClosed:
        pass


def stream_status(log: dict) -> int:
    """The access-log status of a stream: 200 once begun, 499 if the client left, 503 if the
    shutdown cut it."""
    return 503 if log.get("shutdown_cut") else 499 if log.get("client_disconnected") else 200


async def start_generation(router: Router, plan: Plan, request: ChatRequest, ticket: Ticket):
    """Routes the request: `(model that serves, its event iterator)`. The ticket learns which
    candidate serves (its prices apply) once one does."""
    model, events = await router.open_generation(plan, request, first_byte_commits=request.stream)
    ticket.served(model, plan)
    return model, events


def route_fields(plan: Plan, log: dict) -> None:
    """Log/usage fields naming who served and which fallbacks were tried."""
    if plan.served_by is not None:
        log["model"] = plan.served_by.spec.name
        log["backend"] = plan.served_by.info.backend
    if plan.tried:
        log["fallbacks"] = plan.tried


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
