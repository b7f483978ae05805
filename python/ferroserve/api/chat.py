"""`POST /v1/chat/completions` (plain and SSE streaming)."""

from __future__ import annotations

import asyncio

import msgspec

from ferroserve.api.generate import (
    DONE, FINGERPRINT, SSE_HEADERS, Choice, Disconnect, Outcome, apply, encode, error_event, failure_error, new_id, now,
    route_fields, sampling_params, sse, start_generation,
)
from ferroserve.backends.base import ChatRequest, Delta, Failed, Finished, Message, estimate_tokens
from ferroserve.errors import from_validation, invalid
from ferroserve.gateway.gate import Ticket
from ferroserve.gateway.router import Router
from ferroserve.schemas.chat import ChatCompletionRequest, chat_decoder


def messages_of(req) -> list[Message]:
    if not req.messages:
        raise invalid("messages must contain at least one message.", param="messages")
    out = []
    for m in req.messages:
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
        out.append(Message(m.role, content))
    return out


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


async def create_chat_completion(router: Router, body: bytes, proto, ticket: Ticket) -> tuple[int, bytes | None, dict]:
    """Returns (status, body, log fields); body None means the SSE response was sent."""
    try:
        req = chat_decoder.decode(body)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise from_validation(exc) from None
    router.require(req.model, "chat")
    if req.tools and req.tool_choice not in (None, "none"):
        raise invalid("Tool calling is not supported by this model yet.", param="tools")
    top = req.top_logprobs or 0
    if top and not req.logprobs:
        raise invalid("top_logprobs requires logprobs to be true.", param="top_logprobs")
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    params = sampling_params(req, max_tokens=max_tokens, logprobs=bool(req.logprobs), top_logprobs=top)
    request = ChatRequest(messages=messages_of(req), params=params, stream=req.stream)
    plan = router.plan(req.model, "chat", req.route, prompt_tokens_hint=estimate_tokens(request), max_tokens=max_tokens or 0)
    ticket.admit_plan([plan], [request], (max_tokens or 0) * params.n)
    cid, created = new_id("chatcmpl"), now()
    log: dict = {"model": plan.candidates[0].spec.name}
    disconnect = Disconnect(proto)
    try:
        model, events = await start_generation(router, plan, request, ticket)
        name = plan.response_model_name()
        route_fields(plan, log)
        if not req.stream:
            outcome = Outcome([Choice() for _ in range(params.n)], 0)
            async for ev in events:
                apply(outcome, ev)
            log.update(prompt_tokens=outcome.prompt_tokens, completion_tokens=outcome.completion_tokens,
                       cached_tokens=outcome.cached_tokens)
            choices = [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": "".join(c.text)},
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
        return 200, None, log
    except asyncio.CancelledError:
        if not disconnect.absorb():
            raise
        log["client_disconnected"] = True
        return 499, None, log
    finally:
        disconnect.close()


async def _stream(events, n, req, cid, created, name, plan, proto, log, ticket) -> None:
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    head = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": name, "system_fingerprint": FINGERPRINT}

    def chunk(index: int, delta: dict, finish_reason=None, logprobs=None) -> bytes:
        body = {**head, "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}]}
        if include_usage:
            body["usage"] = None
        return sse(encode(body))

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
    try:
        async for ev in events:
            t = type(ev)
            if t is Failed:
                pending.append(error_event(failure_error(ev.error)) + DONE)
                await transport.send_bytes(b"".join(pending))
                return
            apply(outcome, ev)
            if t is Delta:
                if ev.text or ev.logprobs:
                    ticket.first_token()
                    lp = _logprobs_json(ev.logprobs) if (req.logprobs and ev.logprobs) else None
                    pending.append(chunk(ev.index, {"content": ev.text}, logprobs=lp))
            elif t is Finished:
                pending.append(chunk(ev.index, {}, finish_reason=ev.reason))
                if outcome.finished:
                    if include_usage:
                        pending.append(sse(encode({**head, "choices": [], "usage": outcome.usage()})))
                    pending.append(DONE)
            else:
                continue
            await transport.send_bytes(b"".join(pending))
            pending = []
    except Exception:
        pass  # the client went away mid-write (or the stream broke): stop generating
    finally:
        # Metered even when the client left early: what was generated was generated.
        log.update(prompt_tokens=outcome.prompt_tokens, cached_tokens=outcome.cached_tokens,
                   completion_tokens=outcome.completion_tokens if outcome.finished else outcome.generated_tokens)
        await events.aclose()
        # A stream resumed on a fallback mid-answer: the usage names who finished it.
        ticket.served(plan.served_by, plan)
        route_fields(plan, log)
