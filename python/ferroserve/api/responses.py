"""`/v1/responses`: OpenAI's Responses API over the same routing, backends and metering as
chat completions.

A response is one chat generation: `instructions` become a system message, the stored
conversation of `previous_response_id` (each earlier response's input items and output, oldest
first) comes next, then this request's `input`. Stored responses live in the gateway's SQLite
`responses` table, scoped to the caller's workspace; every read and write goes through the
store thread (`Gateway.call`). `background: true` answers at once with status `queued` and runs
the generation as a task on this event loop; the task settles and records its own usage when
it ends (the create request then carries `METERED_LATER` and the app meters nothing). The row
keeps the job, so a background response survives its process (`response_jobs`)."""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

import msgspec

from ferroserve.api.chat import function_tools
from ferroserve.api.generate import (
    SSE_HEADERS, Choice, Disconnect, Outcome, ProtocolClosed, apply, cut_by_shutdown, encode, end_cut_stream, failure_error,
    max_tokens_of, response_format_of, route_fields, shutdown_error, start_generation, stream_status,
)
from ferroserve.api.response_jobs import BackgroundJobs, Job, decode_job, encode_job
from ferroserve.backends.base import (
    ChatRequest, Delta, Failed, Message, SamplingParams, Tool, ToolCall, ToolCallDelta, estimate_tokens,
)
from ferroserve.errors import ApiError, from_validation, invalid
from ferroserve.gateway.gate import Gateway, Ticket
from ferroserve.gateway.router import Plan, Router
from ferroserve.log import logger
from ferroserve.schemas.responses import (
    CREATE_FIELDS, INPUT_TOKENS_FIELDS, REFUSED_FIELDS, InputTokensRequest, ResponseCreateRequest,
)

ROUTE = "/v1/responses"
# A log field the create handler returns for a background response: the app then neither
# settles nor records usage for the request; the background task does when it ends.
METERED_LATER = "metered_later"
ACTIVE = ("queued", "in_progress")
# This process's background generations (`start_background`); None without a gateway.
_jobs: BackgroundJobs | None = None

_to_json = msgspec.json.Encoder().encode
_from_json = msgspec.json.decode


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def _needs_gateway(gateway: Gateway | None, why: str) -> Gateway:
    if gateway is None:
        raise ApiError(503, f"{why} needs the gateway's database, which is turned off on this server "
                            "(FERROSERVE_GATEWAY=off).", type="server_error", code="gateway_disabled")
    return gateway


# Requests -----------------------------------------------------------------------------------
def _decode(body: bytes, known: frozenset[str], struct_type):
    try:
        raw = msgspec.json.decode(body)
    except msgspec.DecodeError as exc:
        raise from_validation(exc) from None
    if not isinstance(raw, dict):
        raise invalid("The request body must be a JSON object.")
    for name, value in raw.items():
        if name in known:
            continue
        if name in REFUSED_FIELDS:
            if value is None:
                continue
            raise invalid(f"`{name}` is not supported by this server.", param=name, code="unsupported_parameter")
        raise invalid(f"Unknown parameter: '{name}'.", param=name, code="unknown_parameter")
    try:
        return msgspec.convert(raw, struct_type)
    except msgspec.ValidationError as exc:
        raise from_validation(exc) from None


def _unsupported(message: str, param: str) -> ApiError:
    return invalid(message, param=param, code="unsupported_parameter")


def tools_of(req: ResponseCreateRequest | InputTokensRequest) -> tuple[list[Tool] | None, str, str | None, bool]:
    """Responses' function tools (flat: `{type: function, name, parameters, ...}`) and
    `tool_choice` (`{type: function, name}` for a named one), checked as chat checks its own."""
    functions = []
    for i, t in enumerate(req.tools or ()):
        kind = t.get("type") if isinstance(t, dict) else None
        if kind != "function":
            raise _unsupported(f"tools[{i}]: tools of type {kind!r} are not supported; this server calls function tools only.",
                               "tools")
        functions.append((f"tools[{i}]", t))
    choice, named = req.tool_choice, None
    if isinstance(choice, dict):
        if choice.get("type") != "function" or not isinstance(choice.get("name"), str):
            raise _unsupported("tool_choice must be 'none', 'auto', 'required' or {'type': 'function', 'name': ...}.",
                               "tool_choice")
        choice, named = None, choice["name"]
    elif choice is not None and not isinstance(choice, str):
        raise invalid("tool_choice must be a string or an object.", param="tool_choice")
    return function_tools(functions, choice, named, req.parallel_tool_calls)


def _check_common(req: ResponseCreateRequest | InputTokensRequest) -> None:
    """Fields OpenAI defines whose value we can honour only in its neutral form."""
    if req.truncation not in (None, "disabled"):
        raise _unsupported("truncation 'auto' (dropping input to fit the context) is not supported; use 'disabled'.",
                           "truncation")
    if req.reasoning and any(v is not None for v in req.reasoning.values()):
        raise _unsupported("reasoning options are not supported: the served models do not reason.", "reasoning")


def _check_create(req: ResponseCreateRequest) -> None:
    _check_common(req)
    if req.include:
        raise _unsupported(f"include values {req.include} are not supported.", "include")
    if req.top_logprobs:
        raise _unsupported("top_logprobs is not supported on /v1/responses yet.", "top_logprobs")
    if req.service_tier not in (None, "auto", "default", "flex"):
        raise _unsupported(f"service_tier {req.service_tier!r} is not supported; use 'auto', 'default' or 'flex' "
                           "(batch priority).", "service_tier")
    for name, value in (req.stream_options or {}).items():
        if name != "include_obfuscation":
            raise invalid(f"Unknown parameter: 'stream_options.{name}'.", param="stream_options", code="unknown_parameter")
        if value:
            raise _unsupported("Stream obfuscation is not supported; set include_obfuscation to false.", "stream_options")
    if req.max_output_tokens is not None and req.max_output_tokens < 1:
        raise invalid("max_output_tokens must be at least 1.", param="max_output_tokens")
    if req.background and req.store is False:
        raise invalid("A background response must be stored (store: true).", param="store")


def _as_text_format(err: ApiError) -> ApiError:
    """chat's `response_format` checks and the engine name `response_format`; here it is `text.format`."""
    if err.param == "response_format":
        err.param = "text.format"
        err.message = err.message.replace("response_format.json_schema", "text.format").replace("response_format", "text.format")
    return err


def text_format(text: dict[str, Any] | None) -> tuple[dict, dict | None]:
    """`text` -> (what the response echoes, the sampler's response_format or None for free text)."""
    if text is None:
        return {"format": {"type": "text"}, "verbosity": "medium"}, None
    for name in text:
        if name not in ("format", "verbosity"):
            raise invalid(f"Unknown parameter: 'text.{name}'.", param="text", code="unknown_parameter")
    if text.get("verbosity") not in (None, "medium"):
        raise _unsupported("text.verbosity other than 'medium' is not supported.", "text.verbosity")
    fmt = text.get("format") or {"type": "text"}
    if not isinstance(fmt, dict) or not isinstance(fmt.get("type"), str):
        raise invalid("text.format must be an object with a `type`.", param="text.format")
    kind = fmt["type"]
    echo = {"format": fmt, "verbosity": "medium"}
    if kind == "text":
        return echo, None
    if kind == "json_object":
        return echo, {"type": "json_object"}
    if kind != "json_schema":
        raise invalid(f"text.format type {kind!r} is not supported: use 'text', 'json_object' or 'json_schema'.",
                      param="text.format")
    for name in fmt:
        if name not in ("type", "name", "schema", "strict", "description"):
            raise invalid(f"Unknown parameter: 'text.format.{name}'.", param="text.format", code="unknown_parameter")
    spec = {k: fmt[k] for k in ("name", "schema", "strict", "description") if k in fmt}
    try:
        return echo, response_format_of({"type": "json_schema", "json_schema": spec})
    except ApiError as err:
        raise _as_text_format(err) from None


def message_item(role: str, texts: list[str], item_id: str | None = None, status: str = "completed") -> dict:
    """A conversation item in OpenAI's shape: input messages carry `input_text` parts, the
    assistant's carry `output_text`."""
    if role == "assistant":
        content = [{"type": "output_text", "text": t, "annotations": []} for t in texts]
    else:
        content = [{"type": "input_text", "text": t} for t in texts]
    return {"id": item_id or _id("msg"), "type": "message", "role": role, "status": status, "content": content}


_ROLES = ("user", "system", "developer", "assistant")


def input_items(value: str | list[dict[str, Any]]) -> list[dict]:
    """`input` as stored items: messages whose content is a string or text parts."""
    if isinstance(value, str):
        return [message_item("user", [value])]
    if not value:
        raise invalid("input must contain at least one item.", param="input")
    items = []
    for i, item in enumerate(value):
        kind = item.get("type", "message")
        if kind in ("function_call", "function_call_output"):
            items.append(_call_item(i, kind, item))
            continue
        if kind != "message":
            raise _unsupported(f"input[{i}]: items of type {kind!r} are not supported (messages, function_call and "
                               "function_call_output).", "input")
        role = item.get("role")
        if role not in _ROLES:
            raise invalid(f"input[{i}].role must be one of {', '.join(_ROLES)}.", param="input")
        content = item.get("content")
        allowed = ("output_text", "input_text") if role == "assistant" else ("input_text",)
        if isinstance(content, str):
            texts = [content]
        elif isinstance(content, list):
            texts = []
            for part in content:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind not in allowed or not isinstance(part.get("text"), str):
                    raise _unsupported(f"input[{i}].content: parts of type {kind!r} are not supported for role {role!r} "
                                       f"(this model reads text: {', '.join(allowed)}).", "input")
                texts.append(part["text"])
        else:
            raise invalid(f"input[{i}].content must be a string or a list of content parts.", param="input")
        item_id = item.get("id")
        items.append(message_item(role, texts, item_id if isinstance(item_id, str) and item_id else None))
    return items


def _call_item(i: int, kind: str, item: dict) -> dict:
    """An input `function_call` (a call the model made earlier) or `function_call_output` (its
    result), as stored."""
    call_id = item.get("call_id")
    if not isinstance(call_id, str) or not call_id:
        raise invalid(f"input[{i}]: a {kind} item needs its call_id.", param="input")
    item_id = item.get("id") if isinstance(item.get("id"), str) and item.get("id") else None
    if kind == "function_call":
        name, arguments = item.get("name"), item.get("arguments")
        if not isinstance(name, str) or not isinstance(arguments, str):
            raise invalid(f"input[{i}]: a function_call item needs a name and arguments (JSON text).", param="input")
        return {"id": item_id or _id("fc"), "type": kind, "status": "completed", "arguments": arguments, "call_id": call_id,
                "name": name}
    output = item.get("output")
    if isinstance(output, list):  # text parts
        if not all(isinstance(p, dict) and p.get("type") in ("input_text", "output_text") and isinstance(p.get("text"), str)
                   for p in output):
            raise _unsupported(f"input[{i}].output: only text parts are supported.", "input")
        output = "".join(p["text"] for p in output)
    if not isinstance(output, str):
        raise invalid(f"input[{i}]: a function_call_output item needs its output (a string).", param="input")
    return {"id": item_id or _id("fco"), "type": kind, "status": "completed", "call_id": call_id, "output": output}


def messages_of(instructions: str | None, items: list[dict]) -> list[Message]:
    """The prompt's messages: a function call joins the assistant turn before it (the text
    the model wrote, or the calls it made alongside), its output is a `tool` message."""
    out = [Message("system", instructions)] if instructions else []
    for item in items:
        kind = item["type"]
        if kind == "function_call":
            call = ToolCall(item["call_id"], item["name"], item["arguments"])
            if out and out[-1].role == "assistant":
                out[-1].tool_calls = [*(out[-1].tool_calls or ()), call]
            else:
                out.append(Message("assistant", "", [call]))
        elif kind == "function_call_output":
            out.append(Message("tool", item["output"], None, item["call_id"]))
        else:
            texts = [part["text"] for part in item["content"]]
            out.append(Message(item["role"], texts[0] if len(texts) == 1 else [("text", t) for t in texts]))
    return out


async def _conversation(gateway: Gateway | None, ticket: Ticket, previous_id: str | None) -> tuple[list[dict], dict | None]:
    """The stored conversation `previous_id` continues (inputs and outputs, oldest first) and
    its last row; 400 if the workspace has no such response."""
    if previous_id is None:
        return [], None
    gw = _needs_gateway(gateway, "previous_response_id")
    chain = await gw.call(lambda s: s.response_chain(previous_id, ticket.workspace or ""))
    if not chain:
        raise invalid(f"Previous response with id '{previous_id}' not found.", param="previous_response_id",
                      code="previous_response_not_found")
    if chain[-1]["status"] in ACTIVE:
        raise invalid(f"Previous response '{previous_id}' is still {chain[-1]['status']}.", param="previous_response_id")
    items: list[dict] = []
    for row in chain:
        items += _from_json(row["input_items"])
        items += _from_json(row["output"])
    return items, chain[-1]


# The response object -------------------------------------------------------------------------
@dataclass
class Stored:
    """One response: what the client sees and what the `responses` table keeps."""

    id: str
    workspace: str
    created_at: float
    status: str
    model: str
    params: dict  # the request fields the response echoes (instructions, text, temperature...)
    input_items: list[dict]  # this request's own input (not the earlier conversation)
    previous_response_id: str | None = None
    output: list[dict] = field(default_factory=list)
    usage: dict | None = None
    error: dict | None = None
    incomplete_details: dict | None = None
    completed_at: float | None = None

    def json(self) -> dict:
        texts = [p["text"] for item in self.output if item["type"] == "message" for p in item["content"]
                 if p["type"] == "output_text"]
        return {
            "id": self.id, "object": "response", "created_at": int(self.created_at), "status": self.status,
            "completed_at": int(self.completed_at) if self.completed_at is not None else None,
            "error": self.error, "incomplete_details": self.incomplete_details, "model": self.model,
            "output": self.output, "output_text": "".join(texts), "previous_response_id": self.previous_response_id,
            "usage": self.usage, **self.params,
        }

    def result(self) -> dict:
        """The columns a finished generation writes."""
        return {"status": self.status, "model": self.model, "output": _to_json(self.output).decode(),
                "usage": _to_json(self.usage).decode() if self.usage is not None else None,
                "error": _to_json(self.error).decode() if self.error is not None else None,
                "incomplete_details": _to_json(self.incomplete_details).decode() if self.incomplete_details else None,
                "completed_at": self.completed_at}

    def row(self) -> dict:
        return {"id": self.id, "workspace": self.workspace, "created_at": self.created_at,
                "request": _to_json(self.params).decode(), "input_items": _to_json(self.input_items).decode(),
                "previous_response_id": self.previous_response_id, **self.result()}

    @classmethod
    def from_row(cls, row: dict) -> Stored:
        def load(name: str):
            return _from_json(row[name]) if row[name] is not None else None

        return cls(id=row["id"], workspace=row["workspace"], created_at=row["created_at"], status=row["status"],
                   model=row["model"], params=load("request"), input_items=load("input_items"),
                   previous_response_id=row["previous_response_id"], output=load("output"), usage=load("usage"),
                   error=load("error"), incomplete_details=load("incomplete_details"), completed_at=row["completed_at"])


class Generation:
    """The output a response generates, folded from backend events: the assistant's message
    and its function calls, in the order they began."""

    def __init__(self, record: Stored) -> None:
        self.record = record
        self.outcome = Outcome([Choice()], 0)
        self.items: list[dict] = []
        self.message: dict | None = None
        self._calls: dict[int, dict] = {}
        self.error: ApiError | None = None

    @property
    def text(self) -> str:
        return "".join(self.outcome.choices[0].text)

    def fold(self, ev) -> dict | None:
        """Folds one event (raises ApiError for a failure); returns the output item it began."""
        if type(ev) is ToolCallDelta:
            call, began = self._calls.get(ev.call_index), None
            if call is None:
                call = {"id": _id("fc"), "type": "function_call", "status": "in_progress", "arguments": "",
                        "call_id": ev.id or _id("call"), "name": ev.name or ""}
                self._calls[ev.call_index] = call
                self.items.append(call)
                began = dict(call)  # as it began: no arguments yet
            call["arguments"] += ev.arguments
            return began
        apply(self.outcome, ev)
        if type(ev) is Delta and ev.text and self.message is None:
            return self._begin_message()
        return None

    def call_item(self, call_index: int) -> dict:
        return self._calls[call_index]

    def _begin_message(self) -> dict:
        self.message = {**message_item("assistant", [], None, "in_progress"), "content": []}
        self.items.append(self.message)
        return dict(self.message)

    def finish(self, plan: Plan) -> None:
        rec, choice = self.record, self.outcome.choices[0]
        cut = choice.finish_reason == "length"
        rec.status = "incomplete" if cut else "completed"
        rec.incomplete_details = {"reason": "max_output_tokens"} if cut else None
        if not self.items:  # nothing at all was generated: still one (empty) message
            self._begin_message()
        for item in self.items:
            item["status"] = rec.status
        if self.message is not None:
            self.message["content"] = [{"type": "output_text", "text": self.text, "annotations": []}]
        rec.output = self.items
        rec.completed_at = time.time() if not cut else None
        rec.model = plan.response_model_name()
        rec.usage = usage_of(self.outcome)

    def fail(self, err: ApiError) -> None:
        self.error = err
        rec = self.record
        rec.status = "failed"
        rec.error = {"code": err.code or err.type, "message": err.message}
        rec.usage = usage_of(self.outcome)

    def log_tokens(self, log: dict) -> None:
        o = self.outcome
        log.update(prompt_tokens=o.prompt_tokens, cached_tokens=o.cached_tokens,
                   completion_tokens=o.completion_tokens if o.finished else o.generated_tokens)


def usage_of(outcome: Outcome) -> dict:
    done = outcome.completion_tokens if outcome.finished else outcome.generated_tokens
    return {"input_tokens": outcome.prompt_tokens, "input_tokens_details": {"cached_tokens": outcome.cached_tokens},
            "output_tokens": done, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": outcome.prompt_tokens + done}


# POST /v1/responses --------------------------------------------------------------------------
async def create_response(router: Router, gateway: Gateway | None, body: bytes, proto, ticket: Ticket):
    """Returns (status, body, log fields); body None means the SSE response was sent."""
    req = _decode(body, CREATE_FIELDS, ResponseCreateRequest)
    router.require(req.model, "chat")
    _check_create(req)
    if req.service_tier == "flex":
        ticket.end_interactive()  # batch priority: batch work need not wait for it
    tools, tool_choice, tool_function, parallel = tools_of(req)
    text_echo, response_format = text_format(req.text)
    store = req.store if req.store is not None else gateway is not None
    background = bool(req.background)
    store_in = _needs_gateway(gateway, "store: true") if store else None
    own_items = input_items(req.input)
    prior, _ = await _conversation(gateway, ticket, req.previous_response_id)
    max_output_tokens = max_tokens_of(router, req.max_output_tokens, "max_output_tokens")
    params = SamplingParams(max_tokens=max_output_tokens,
                            temperature=1.0 if req.temperature is None else req.temperature,
                            top_p=1.0 if req.top_p is None else req.top_p, response_format=response_format)
    # A background generation streams too: a cancel then meters what was generated so far.
    request = ChatRequest(messages=messages_of(req.instructions, prior + own_items), params=params,
                          stream=bool(req.stream or req.background), tools=tools, tool_choice=tool_choice,
                          tool_choice_function=tool_function, parallel_tool_calls=parallel,
                          priority="batch" if req.service_tier == "flex" else "interactive")
    max_tokens = max_output_tokens or 0
    plan = router.plan(req.model, "chat", req.route, prompt_tokens_hint=estimate_tokens(request), max_tokens=max_tokens)
    ticket.admit_plan([plan], [request], max_tokens)
    echo = {
        "instructions": req.instructions, "max_output_tokens": req.max_output_tokens, "temperature": params.temperature,
        "top_p": params.top_p, "text": text_echo, "store": store, "background": background, "metadata": req.metadata or {},
        "parallel_tool_calls": parallel, "tool_choice": req.tool_choice or "auto", "tools": req.tools or [],
        "truncation": "disabled", "user": req.user,
        "service_tier": "flex" if req.service_tier == "flex" else "default", "reasoning": {"effort": None, "summary": None}, "top_logprobs": 0,
    }
    record = Stored(id=_id("resp"), workspace=ticket.workspace or "", created_at=time.time(),
                    status="queued" if background else "in_progress", model=plan.response_model_name(), params=echo,
                    input_items=own_items, previous_response_id=req.previous_response_id)
    log: dict = {"model": plan.candidates[0].spec.name}
    if background:
        gw, jobs = _needs_gateway(gateway, "background: true"), _jobs
        assert jobs is not None, "start_background() was not called"
        key_id = ticket.key.id if ticket.key is not None else None
        job = Job(model=req.model, route=req.route, max_tokens=max_tokens, request=request, request_id=ticket.request_id,
                  key_id=key_id)
        row = {**record.row(), "key_id": key_id, "owner": jobs.owner, "heartbeat": time.time(), "job": encode_job(job)}
        await gw.call(lambda s: s.insert_response(row))
        stream = _logs[record.id] = EventLog()
        await stream.extend([_sse_event("response.created", stream.seq, response=record.json())])
        jobs.spawn(record.id, _run_background(router, gw, plan, request, ticket, record))
        if not req.stream:
            return 200, encode(record.json()), {**log, METERED_LATER: True}
        # Streamed as it runs; a client that leaves stops reading, not the generation.
        with Disconnect(proto):
            await stream.follow(proto.response_stream(200, [*SSE_HEADERS, *ticket.response_headers()]), -1)
        return 200, None, {**log, METERED_LATER: True}
    gen = Generation(record)
    try:
        with Disconnect(proto):
            _, events = await start_generation(router, plan, request, ticket)
            route_fields(plan, log)
            if req.stream:
                await _stream(gen, events, plan, proto, ticket, log, store_in)
                return stream_status(log), None, log
            try:
                async for ev in events:
                    gen.fold(ev)
            finally:
                await events.aclose()
            gen.finish(plan)
            gen.log_tokens(log)
            if store_in is not None:
                await store_in.call(lambda s: s.insert_response(record.row()))
            out = record.json()
            if plan.routed:
                out["routing"] = plan.routing()
            return 200, encode(out), log
    except ApiError as err:
        raise _as_text_format(err) from None
    log["client_disconnected"] = True
    return 499, None, log


def _sse_event(kind: str, sequence: itertools.count, **body) -> bytes:
    payload = {"type": kind, "sequence_number": next(sequence), **body}
    return b"event: " + kind.encode() + b"\ndata: " + encode(payload) + b"\n\n"


class EventLog:
    """A background response's SSE events as its generation produces them (event `n` has
    sequence number `n`), for the clients that stream it: the creator and `GET ...?stream=true`
    with `starting_after`. Lives while the generation runs; followers keep reading to the end."""

    def __init__(self) -> None:
        self.seq = itertools.count()
        self.events: list[bytes] = []
        self.closed = False
        self._changed = asyncio.Condition()

    async def extend(self, events: list[bytes]) -> None:
        async with self._changed:
            self.events += events
            self._changed.notify_all()

    async def close(self) -> None:
        async with self._changed:
            self.closed = True
            self._changed.notify_all()

    async def follow(self, transport, after: int) -> None:
        """Sends the events after sequence number `after`, then each new one, until the end."""
        sent = after + 1
        while True:
            async with self._changed:
                await self._changed.wait_for(lambda: len(self.events) > sent or self.closed)
                chunk, closed = self.events[sent:], self.closed
            if chunk:
                try:
                    await transport.send_bytes(b"".join(chunk))
                except Exception:
                    return  # the client went away: the generation goes on
                sent += len(chunk)
            elif closed:
                return


# Event logs of the background responses this process runs, by response id.
_logs: dict[str, EventLog] = {}


async def _events(gen: Generation, events, plan: Plan, ticket: Ticket, seq: itertools.count, *,
                  created: bool = True) -> AsyncIterator[list[bytes]]:
    """OpenAI's event sequence for the output items (the message, function calls) as they
    begin, one list per step; `created`: also `response.created` first (a background response
    announced it when it was queued)."""
    rec = gen.record
    head = rec.json()
    if plan.routed:
        head["routing"] = plan.routing()
    announced: set[str] = set()

    def begin(item: dict) -> list[bytes]:
        announced.add(item["id"])
        index = next(n for n, i in enumerate(gen.items) if i["id"] == item["id"])
        out = [_sse_event("response.output_item.added", seq, output_index=index, item=item)]
        if item["type"] == "message":
            out.append(_sse_event("response.content_part.added", seq, item_id=item["id"], output_index=index,
                                  content_index=0, part={"type": "output_text", "text": "", "annotations": []}))
        return out

    yield ([_sse_event("response.created", seq, response=head)] if created else []) \
        + [_sse_event("response.in_progress", seq, response=head)]
    async for ev in events:
        t = type(ev)
        if t is Failed:
            gen.fail(_as_text_format(failure_error(ev.error)))
            yield [_sse_event("response.failed", seq, response=rec.json())]
            return
        began = gen.fold(ev)
        out = begin(began) if began is not None else []
        if t is Delta and ev.text:
            index = gen.items.index(gen.message)
            out.append(_sse_event("response.output_text.delta", seq, item_id=gen.message["id"], output_index=index,
                                  content_index=0, delta=ev.text, logprobs=[]))
        elif t is ToolCallDelta and ev.arguments:
            call = gen.call_item(ev.call_index)
            out.append(_sse_event("response.function_call_arguments.delta", seq, item_id=call["id"],
                                  output_index=gen.items.index(call), delta=ev.arguments))
        if out:
            ticket.first_token()
            yield out
    gen.finish(plan)
    out = []
    for index, item in enumerate(rec.output):
        if item["id"] not in announced:  # an empty answer's message
            out += begin({**item, "status": "in_progress", "content": []})
        if item["type"] == "message":
            text = item["content"][0]["text"]
            where = {"item_id": item["id"], "output_index": index, "content_index": 0}
            out.append(_sse_event("response.output_text.done", seq, **where, text=text, logprobs=[]))
            out.append(_sse_event("response.content_part.done", seq, **where, part=item["content"][0]))
        else:
            out.append(_sse_event("response.function_call_arguments.done", seq, item_id=item["id"], output_index=index,
                                  arguments=item["arguments"]))
        out.append(_sse_event("response.output_item.done", seq, output_index=index, item=item))
    kind = "response.incomplete" if rec.status == "incomplete" else "response.completed"
    yield [*out, _sse_event(kind, seq, response=rec.json())]


async def _stream(gen: Generation, events, plan: Plan, proto, ticket: Ticket, log: dict, gateway: Gateway | None) -> None:
    """A foreground stream; `gateway` given: store the response once it reached a final state."""
    rec = gen.record
    transport = proto.response_stream(200, [*SSE_HEADERS, *ticket.response_headers()])

    def usage_fields() -> None:
        gen.log_tokens(log)
        # A stream resumed on a fallback mid-answer: the usage names who finished it.
        if plan.served_by is not None:
            ticket.served(plan.served_by, plan)
        route_fields(plan, log)

    stored = False
    seq = itertools.count()
    try:
        async for chunk in _events(gen, events, plan, ticket, seq):
            if rec.status not in ACTIVE:
                # The final events: the usage (and a stored response) are committed before them.
                usage_fields()
                await ticket.finish(200, log)
                if gateway is not None:
                    await gateway.call(lambda s: s.insert_response(rec.row()))
                    stored = True
            await transport.send_bytes(b"".join(chunk))
    except ProtocolClosed:
        log["client_disconnected"] = True  # the client went away mid-write: stop generating
    except asyncio.CancelledError as exc:
        if not cut_by_shutdown(exc):
            raise
        err = shutdown_error()
        await end_cut_stream(transport, _sse_event("error", seq, code=err.code, message=err.message, param=None), log)
    except Exception:
        pass  # the stream broke: what was sent stands
    finally:
        usage_fields()
        await events.aclose()
    if rec.status not in ACTIVE and gateway is not None and not stored:
        await gateway.call(lambda s: s.insert_response(rec.row()))


async def _run_background(router: Router, gateway: Gateway, plan: Plan, request: ChatRequest, ticket: Ticket,
                          record: Stored) -> None:
    """A background response from `queued` to its final state; then its usage is settled and
    recorded as the app does for a request answered in the foreground."""
    gen = Generation(record)
    log: dict = {"model": plan.candidates[0].spec.name}
    status, error_code, events = 200, None, None
    stream = _logs.get(record.id)
    if stream is None:  # recovered from another process: announced afresh
        stream = _logs[record.id] = EventLog()
        await stream.extend([_sse_event("response.created", stream.seq, response=record.json())])
    try:
        record.status = "in_progress"
        await gateway.call(lambda s: s.update_response(record.id, {"status": "in_progress"}))
        _, events = await start_generation(router, plan, request, ticket)
        async for chunk in _events(gen, events, plan, ticket, stream.seq, created=False):
            await stream.extend(chunk)
        if gen.error is not None:
            status, error_code = gen.error.status, gen.error.code or gen.error.type
    except asyncio.CancelledError:
        gen.finish(plan)  # what was generated before the cancel
        record.status, record.incomplete_details, record.completed_at = "cancelled", None, None
        for item in record.output:
            item["status"] = "incomplete"
        status, error_code = 499, "cancelled"
    except ApiError as err:
        gen.fail(_as_text_format(err))
        status, error_code = err.status, err.code or err.type
    except Exception:
        logger.exception("background response failed", extra={"fields": {"response_id": record.id}})
        gen.fail(ApiError(500, "The server had an error while processing your request.", type="server_error",
                          code="server_error"))
        status, error_code = 500, "server_error"
    if events is not None:
        await events.aclose()
    gen.log_tokens(log)
    if plan.served_by is not None:
        ticket.served(plan.served_by, plan)
        route_fields(plan, log)
    cost = gateway.settle(ticket, log)
    gateway.record(ticket, ticket.started, ROUTE, status, log, cost, error_code, True)
    owner, result = _jobs.owner if _jobs is not None else "", record.result()
    try:
        await gateway.call(lambda s: s.finish_response(record.id, owner, result))
    finally:
        _logs.pop(record.id, None)
        await stream.close()


async def _recover(router: Router, gateway: Gateway, row: dict) -> None:
    """Runs a background response again whose process died (or stopped) before it finished."""
    record, job = Stored.from_row(row), decode_job(row["job"])
    record.status = "queued"
    key = gateway.key_by_id(job.key_id) if job.key_id is not None else None
    ticket = Ticket(gateway, job.request_id, time.perf_counter(), key, record.workspace, None, False)
    try:
        plan = router.plan(job.model, "chat", job.route, prompt_tokens_hint=estimate_tokens(job.request),
                           max_tokens=job.max_tokens)
        ticket.restrict(plan)
        ticket.served(plan.candidates[0])
    except ApiError as err:  # the model or the key's rights changed since it was accepted
        Generation(record).fail(err)
        owner, result = _jobs.owner if _jobs is not None else "", record.result()
        await gateway.call(lambda s: s.finish_response(record.id, owner, result))
        return
    await _run_background(router, gateway, plan, job.request, ticket, record)


def start_background(loop: asyncio.AbstractEventLoop, router: Router, gateway: Gateway) -> None:
    """At start: this process runs background responses, and picks up those left over."""
    global _jobs
    _jobs = BackgroundJobs(gateway, lambda row: _recover(router, gateway, row))
    _jobs.start(loop)


def stop_background() -> None:
    if _jobs is not None:
        _jobs.stop()


# Stored responses -------------------------------------------------------------------------------
async def _load(gateway: Gateway, ticket: Ticket, response_id: str) -> Stored:
    row = await gateway.call(lambda s: s.get_response(response_id, ticket.workspace or ""))
    if row is None:
        raise _not_found(response_id)
    return Stored.from_row(row)


def _not_found(response_id: str) -> ApiError:
    return ApiError(404, f"No response with id '{response_id}' in this workspace.", param="response_id", code="not_found")


async def get(gateway: Gateway, ticket: Ticket, arg: str, query: str, proto) -> bytes | None:
    """`GET /v1/responses/{id}` and `GET /v1/responses/{id}/input_items`; with `stream=true`, a
    background response's events (after `starting_after`) while it runs here: None, sent."""
    params = parse_qs(query or "")
    response_id, _, rest = arg.partition("/")
    if rest == "input_items":
        return await _input_items(gateway, ticket, response_id, params)
    if rest:
        raise ApiError(404, f"Unknown route GET /v1/responses/{arg}.", code="not_found")
    if params.get("include"):
        raise _unsupported(f"include values {params['include']} are not supported.", "include")
    record = await _load(gateway, ticket, response_id)
    if params.get("stream", ["false"])[-1].lower() != "true":
        return encode(record.json())
    stream = _logs.get(response_id)
    if stream is None:
        raise _unsupported("Only a background response still running on this server can be streamed; this one is "
                           f"{record.status}: GET it without stream.", "stream")
    try:
        after = int(params.get("starting_after", ["-1"])[-1])
    except ValueError:
        raise invalid("starting_after must be an integer (a sequence number).", param="starting_after") from None
    with Disconnect(proto):
        await stream.follow(proto.response_stream(200, [*SSE_HEADERS, *ticket.response_headers()]), after)
    return None


async def _input_items(gateway: Gateway, ticket: Ticket, response_id: str, params: dict) -> bytes:
    """The items the response's model read: the continued conversation, then its own input
    (IPOP's default order `asc`; OpenAI's is `desc`, ask with `order=desc`)."""
    chain = await gateway.call(lambda s: s.response_chain(response_id, ticket.workspace or ""))
    if not chain:
        raise _not_found(response_id)
    items: list[dict] = []
    for row in chain[:-1]:
        items += _from_json(row["input_items"]) + _from_json(row["output"])
    items += _from_json(chain[-1]["input_items"])
    order = params.get("order", ["asc"])[-1]
    if order not in ("asc", "desc"):
        raise invalid("order must be 'asc' or 'desc'.", param="order")
    if order == "desc":
        items.reverse()
    try:
        limit = int(params.get("limit", ["20"])[-1])
    except ValueError:
        raise invalid("limit must be an integer.", param="limit") from None
    if not 1 <= limit <= 100:
        raise invalid("limit must be between 1 and 100.", param="limit")
    after = params.get("after", [None])[-1]
    if after is not None:
        ids = [item["id"] for item in items]
        if after not in ids:
            raise invalid(f"No input item with id '{after}' in this response.", param="after")
        items = items[ids.index(after) + 1:]
    page = items[:limit]
    return encode({"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
                   "last_id": page[-1]["id"] if page else None, "has_more": len(items) > limit})


async def delete(gateway: Gateway, ticket: Ticket, arg: str) -> bytes:
    """`DELETE /v1/responses/{id}`: a background generation still running is cancelled first."""
    await _load(gateway, ticket, arg)  # 404 before anything is stopped: only the workspace's own
    if _jobs is not None:
        await _jobs.stop_local(arg)  # elsewhere, the owner's next heartbeat finds the row gone
    if not await gateway.call(lambda s: s.delete_response(arg, ticket.workspace or "")):
        raise _not_found(arg)
    return encode({"id": arg, "object": "response", "deleted": True})


async def cancel(gateway: Gateway, ticket: Ticket, arg: str) -> bytes:
    """`POST /v1/responses/{id}/cancel`: background responses only; a finished one is returned
    as it is (cancelling twice is harmless)."""
    response_id, _, rest = arg.partition("/")
    if rest != "cancel":
        raise ApiError(404, f"Unknown route POST /v1/responses/{arg}.", code="not_found")
    record = await _load(gateway, ticket, response_id)
    if not record.params.get("background"):
        raise invalid("Only responses created with background: true can be cancelled.", param="response_id")
    if record.status in ACTIVE:
        if _jobs is None or not await _jobs.stop_local(response_id):
            # Another process runs it: mark it. Its next heartbeat sees the mark and stops the
            # generation; its final write keeps `cancelled` and adds what was generated.
            await gateway.call(lambda s: s.update_response(response_id, {"status": "cancelled"}))
        record = await _load(gateway, ticket, response_id)
    return encode(record.json())


# POST /v1/responses/input_tokens -----------------------------------------------------------------
async def input_tokens(router: Router, gateway: Gateway | None, body: bytes, ticket: Ticket) -> bytes:
    """The prompt's tokens as the model would read it, without running it."""
    req = _decode(body, INPUT_TOKENS_FIELDS, InputTokensRequest)
    _check_common(req)
    text_format(req.text)
    prior, last = await _conversation(gateway, ticket, req.previous_response_id)
    model = req.model or (last["model"] if last is not None else None)
    if model is None:
        raise invalid("model is required (or previous_response_id, whose model is used).", param="model")
    router.require(model, "chat")
    items = prior + (input_items(req.input) if req.input is not None else [])
    if not items and not req.instructions:
        raise invalid("input is required.", param="input")
    tools, tool_choice, tool_function, parallel = tools_of(req)
    request = ChatRequest(messages=messages_of(req.instructions, items), params=SamplingParams(), tools=tools,
                          tool_choice=tool_choice, tool_choice_function=tool_function, parallel_tool_calls=parallel)
    plan = router.plan(model, "chat", None, prompt_tokens_hint=estimate_tokens(request))
    ticket.restrict(plan)
    count = plan.candidates[0].backend.count_tokens(request)
    return encode({"object": "response.input_tokens", "input_tokens": count, "input_tokens_details": {"cached_tokens": 0}})
