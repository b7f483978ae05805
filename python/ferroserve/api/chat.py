"""`POST /v1/chat/completions` (plain and SSE streaming)."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import msgspec

from ferroserve.api.generate import (
    DONE, FINGERPRINT, SSE_HEADERS, Choice, Disconnect, Outcome, ProtocolClosed, apply, cut_by_shutdown, encode, end_cut_stream,
    error_event, failure_error, max_tokens_of, new_id, now, route_fields, sampling_params, shutdown_error, sse, start_generation,
    stream_status,
)
from ferroserve.backends.base import (
    ChatRequest, Delta, Failed, Finished, Message, Tool, ToolCall, ToolCallDelta, estimate_tokens,
)
from ferroserve.errors import from_validation, invalid
from ferroserve.gateway.gate import Ticket
from ferroserve.gateway.router import Router
from ferroserve.schemas.chat import ChatCompletionRequest, chat_decoder


def messages_of(req) -> list[Message]:
    if not req.messages:
        raise invalid("messages must contain at least one message.", param="messages")
    out = []
    for i, m in enumerate(req.messages):
        content = m.content
        if content is None:
            content = ""
        elif isinstance(content, list):
            parts = []
            for p in content:
                if p.type == "text":
                    parts.append(("text", p.text or ""))
                else:
                    raise invalid(f"Content parts of type {p.type!r} are not supported by this text-only model.", param="messages")
            content = parts
        calls = _tool_calls_of(i, m.tool_calls) if m.tool_calls else None
        if m.role == "tool" and not m.tool_call_id:
            raise invalid(f"messages[{i}]: a tool message needs its tool_call_id.", param="messages")
        out.append(Message(m.role, content, calls, m.tool_call_id if m.role == "tool" else None))
    return out


def _tool_calls_of(i: int, calls: list[Any]) -> list[ToolCall]:
    out = []
    for call in calls:
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not isinstance(call.get("id"), str):
            raise invalid(f"messages[{i}].tool_calls: each call needs an id and a function with a name.", param="messages")
        arguments = function.get("arguments", "{}")
        if not isinstance(arguments, str):  # some clients send the object itself
            arguments = msgspec.json.encode(arguments).decode()
        out.append(ToolCall(call["id"], function["name"], arguments))
    return out


_FUNCTION_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def tools_of(tools: list[Any] | None, tool_choice: Any, parallel_tool_calls: bool | None) -> tuple[list[Tool] | None, str, str | None, bool]:
    """OpenAI's `tools` / `tool_choice` / `parallel_tool_calls`, checked: (tools or None when
    the model may not call any, "auto" | "required" | "function", the named function, parallel)."""
    functions = []
    for i, t in enumerate(tools or ()):
        function = t.get("function") if isinstance(t, dict) else None
        if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(function, dict):
            raise invalid(f"tools[{i}] must be {{'type': 'function', 'function': {{...}}}}.", param="tools")
        functions.append((f"tools[{i}].function", function))
    named = None
    if isinstance(tool_choice, dict) and tool_choice.get("type") == "function" and isinstance(tool_choice.get("function"), dict):
        named = tool_choice["function"].get("name")
        if not isinstance(named, str):
            raise invalid("tool_choice.function.name must be a string.", param="tool_choice")
    elif tool_choice is not None and not isinstance(tool_choice, str):
        raise invalid("tool_choice must be 'none', 'auto', 'required' or {'type': 'function', 'function': {'name': ...}}.",
                      param="tool_choice")
    return function_tools(functions, tool_choice if isinstance(tool_choice, str) else None, named, parallel_tool_calls)


def function_tools(functions: list[tuple[str, dict]], choice: str | None, named: Any,
                   parallel_tool_calls: bool | None) -> tuple[list[Tool] | None, str, str | None, bool]:
    """The checks chat completions and responses share: `functions` are (where in the request,
    {name, description, parameters, strict}); `choice` a string tool_choice or None; `named`
    the function a tool_choice object names (or None)."""
    parallel = True if parallel_tool_calls is None else bool(parallel_tool_calls)
    specs: list[Tool] = []
    for where, function in functions:
        name = function.get("name")
        if not isinstance(name, str) or not _FUNCTION_NAME.match(name):
            raise invalid(f"{where}.name must be 1-64 letters, digits, '_' or '-'.", param="tools")
        if any(s.name == name for s in specs):
            raise invalid(f"tools: the function name {name!r} is used twice.", param="tools")
        parameters = function.get("parameters")
        if parameters is None:
            parameters = {"type": "object", "properties": {}}
        if not isinstance(parameters, dict):
            raise invalid(f"{where}.parameters must be a JSON schema object.", param="tools")
        description = function.get("description")
        strict = function.get("strict")
        specs.append(Tool(name=name, parameters=parameters, description=description if isinstance(description, str) else None,
                          strict=strict if isinstance(strict, bool) else None))
    if named is not None:
        if not any(s.name == named for s in specs):
            raise invalid(f"tool_choice names the function {named!r}, which is not in tools.", param="tool_choice")
        choice = "function"
    elif choice is None:
        choice = "auto"
    elif choice not in ("none", "auto", "required"):
        raise invalid(f"tool_choice {choice!r} is not one of 'none', 'auto', 'required' or a function.", param="tool_choice")
    if choice == "required" and not specs:
        raise invalid("tool_choice 'required' needs tools.", param="tool_choice")
    if choice == "none" or not specs:
        return None, "auto", None, parallel
    return specs, choice, named, parallel


def _logprobs_json(entries: list[tuple]) -> dict:
    def token(b: bytes) -> str:
        return b.decode("utf-8", errors="replace")

    return {
        "content": [
            {
                "token": token(b),
                "logprob": lp,
                "bytes": list(b),
                "top_logprobs": [{"token": token(tb), "logprob": tlp, "bytes": list(tb)} for (_, tb, tlp) in top],
            }
            for (_, b, lp, top) in entries
        ]
    }


def unhonoured(req: ChatCompletionRequest) -> None:
    """OpenAI's chat fields we take only in a form we honour; anything else is a 400 naming the
    field, never silently ignored. (`metadata`, `prompt_cache_key` and `safety_identifier`
    change nothing that is generated: accepted, as `user` is. Prefix caching is automatic.)"""
    refused = {"audio": req.audio, "prediction": req.prediction, "functions": req.functions,
               "function_call": req.function_call, "reasoning_effort": req.reasoning_effort,
               "web_search_options": req.web_search_options, "prompt_cache_retention": req.prompt_cache_retention}
    for name, value in refused.items():
        if value is not None:
            hint = " Use `tools` and `tool_choice`." if name.startswith("function") else ""
            raise invalid(f"`{name}` is not supported by this server.{hint}", param=name, code="unsupported_parameter")
    if req.service_tier not in (None, "auto", "default", "flex"):
        raise invalid(f"service_tier {req.service_tier!r} is not supported: use 'auto', 'default' or 'flex' (batch priority).",
                      param="service_tier", code="unsupported_parameter")
    if req.store:
        raise invalid("Stored chat completions are not supported (store: true); use /v1/responses to store answers.",
                      param="store", code="unsupported_parameter")
    if req.modalities not in (None, ["text"]):
        raise invalid("Only the text modality is supported.", param="modalities", code="unsupported_parameter")
    if req.verbosity not in (None, "medium"):
        raise invalid("verbosity other than 'medium' is not supported.", param="verbosity", code="unsupported_parameter")


async def create_chat_completion(router: Router, body: bytes, proto, ticket: Ticket,
                                 priority: str = "interactive") -> tuple[int, bytes | None, dict]:
    """Returns (status, body, log fields); body None means the SSE response was sent."""
    try:
        req = chat_decoder.decode(body)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise from_validation(exc) from None
    router.require(req.model, "chat")
    unhonoured(req)
    if req.service_tier == "flex":  # OpenAI's cheaper, slower tier: our batch priority
        priority = "batch"
    if priority == "batch":
        ticket.end_interactive()
    tools, tool_choice, tool_function, parallel = tools_of(req.tools, req.tool_choice, req.parallel_tool_calls)
    top = req.top_logprobs or 0
    if top and not req.logprobs:
        raise invalid("top_logprobs requires logprobs to be true.", param="top_logprobs")
    asked = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    max_tokens = max_tokens_of(router, req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens, asked)
    params = sampling_params(req, max_tokens=max_tokens, logprobs=bool(req.logprobs), top_logprobs=top)
    request = ChatRequest(messages=messages_of(req), params=params, stream=req.stream, tools=tools,
                          tool_choice=tool_choice, tool_choice_function=tool_function, parallel_tool_calls=parallel,
                          priority=priority)
    plan = router.plan(req.model, "chat", req.route, prompt_tokens_hint=estimate_tokens(request), max_tokens=max_tokens or 0)
    ticket.admit_plan([plan], [request], (max_tokens or 0) * params.n)
    cid, created = new_id("chatcmpl"), now()
    log: dict = {"model": plan.candidates[0].spec.name}
    with Disconnect(proto):
        model, events = await start_generation(router, plan, request, ticket)
        name = plan.response_model_name()
        route_fields(plan, log)
        if not req.stream:
            outcome = Outcome([Choice() for _ in range(params.n)], 0)
            calls: list[list[dict]] = [[] for _ in range(params.n)]
            async for ev in events:
                if type(ev) is ToolCallDelta:
                    _fold_call(calls[ev.index], ev)
                else:
                    apply(outcome, ev)
            log.update(prompt_tokens=outcome.prompt_tokens, completion_tokens=outcome.completion_tokens,
                       cached_tokens=outcome.cached_tokens)
            choices = [
                {
                    "index": i,
                    "message": _message(c, calls[i]),
                    "logprobs": _logprobs_json(c.logprobs) if req.logprobs else None,
                    "finish_reason": c.finish_reason,
                }
                for i, c in enumerate(outcome.choices)
            ]
            out = {"id": cid, "object": "chat.completion", "created": created, "model": name,
                   "system_fingerprint": FINGERPRINT, "choices": choices, "usage": outcome.usage()}
            if plan.routed:
                out["routing"] = plan.routing()
            return 200, encode(out), log
        await _stream(events, params.n, req, cid, created, name, plan, proto, log, ticket)
        return stream_status(log), None, log
    log["client_disconnected"] = True
    return 499, None, log


def _fold_call(calls: list[dict], ev: ToolCallDelta) -> None:
    while len(calls) <= ev.call_index:
        calls.append({"id": "", "type": "function", "function": {"name": "", "arguments": ""}})
    call = calls[ev.call_index]
    if ev.id is not None:
        call["id"] = ev.id
    if ev.name is not None:
        call["function"]["name"] = ev.name
    call["function"]["arguments"] += ev.arguments


def _message(choice: Choice, calls: list[dict]) -> dict:
    text = "".join(choice.text)
    if not calls:
        return {"role": "assistant", "content": text}
    return {"role": "assistant", "content": text or None, "tool_calls": calls}


def _call_delta(ev: ToolCallDelta) -> dict:
    """OpenAI's `delta.tool_calls` entry: index, id, type and name first, then arguments."""
    if ev.id is not None or ev.name is not None:
        return {"tool_calls": [{"index": ev.call_index, "id": ev.id, "type": "function",
                                "function": {"name": ev.name, "arguments": ev.arguments}}]}
    return {"tool_calls": [{"index": ev.call_index, "function": {"arguments": ev.arguments}}]}


def text_chunk_parts(head: dict, n: int, include_usage: bool) -> tuple[list[bytes], bytes]:
    """The chunk almost every streamed token makes (`delta: {"content": text}`, no logprobs)
    is the same bytes around the text: encoded once per request, so a token costs one string
    encode. Returns the bytes before the text per choice index, and after it."""
    heads = [sse(encode({**head, "choices": [{"index": i, "delta": {"content": ""}}]}))[:-len(b'""}}]}\n\n')]
             for i in range(n)]
    tail = b'},"logprobs":null,"finish_reason":null}]' + (b',"usage":null' if include_usage else b"") + b"}\n\n"
    return heads, tail


async def _stream(events, n, req, cid, created, name, plan, proto, log, ticket) -> None:
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    head = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": name, "system_fingerprint": FINGERPRINT}

    def chunk(index: int, delta: dict, finish_reason=None, logprobs=None) -> bytes:
        body = {**head, "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}]}
        if include_usage:
            body["usage"] = None
        return sse(encode(body))

    text_heads, text_tail = text_chunk_parts(head, n, include_usage)

    outcome = Outcome([Choice() for _ in range(n)], 0)
    transport = proto.response_stream(200, [*SSE_HEADERS, *ticket.response_headers()])
    first = [chunk(i, {"role": "assistant", "content": ""}) for i in range(n)]
    if plan.routed:
        # The routing answer rides on the first chunk.
        body = {**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                     "finish_reason": None}], "routing": plan.routing()}
        if include_usage:
            body["usage"] = None
        first[0] = sse(encode(body))
    pending: list[bytes] = first

    def usage_fields() -> None:
        # Metered even when the client left early: what was generated was generated.
        log.update(prompt_tokens=outcome.prompt_tokens, cached_tokens=outcome.cached_tokens,
                   completion_tokens=outcome.completion_tokens if outcome.finished else outcome.generated_tokens)
        # A stream resumed on a fallback mid-answer: the usage names who finished it.
        ticket.served(plan.served_by, plan)
        route_fields(plan, log)

    try:
        async for ev in events:
            t = type(ev)
            if t is Failed:
                pending.append(error_event(failure_error(ev.error)) + DONE)
                usage_fields()
                await ticket.finish(200, log)  # the usage is committed before the last byte
                await transport.send_bytes(b"".join(pending))
                return
            if t is ToolCallDelta:
                ticket.first_token()
                pending.append(chunk(ev.index, _call_delta(ev)))
                await transport.send_bytes(b"".join(pending))
                pending = []
                continue
            apply(outcome, ev)
            if t is Delta:
                if ev.text or ev.logprobs:
                    ticket.first_token()
                    if req.logprobs and ev.logprobs:
                        pending.append(chunk(ev.index, {"content": ev.text}, logprobs=_logprobs_json(ev.logprobs)))
                    else:
                        pending.append(text_heads[ev.index] + encode(ev.text) + text_tail)
            elif t is Finished:
                pending.append(chunk(ev.index, {}, finish_reason=ev.reason))
                if outcome.finished:
                    if include_usage:
                        pending.append(sse(encode({**head, "choices": [], "usage": outcome.usage()})))
                    pending.append(DONE)
                    usage_fields()
                    await ticket.finish(200, log)  # the usage is committed before the last byte
            else:
                continue
            await transport.send_bytes(b"".join(pending))
            pending = []
    except ProtocolClosed:
        log["client_disconnected"] = True  # the client went away mid-write: stop generating
    except asyncio.CancelledError as exc:
        if not cut_by_shutdown(exc):
            raise
        await end_cut_stream(transport, error_event(shutdown_error()) + DONE, log)
    except Exception:
        pass  # the stream broke: what was sent stands
    finally:
        usage_fields()
        await events.aclose()
