"""`POST /v1/chat/completions` (plain and SSE streaming)."""

from __future__ import annotations

import msgspec

from ferroserve import _core
from ferroserve.api.generate import (
    DONE, FINGERPRINT, SSE_HEADERS, Choice, Outcome, apply, collect, encode, error_event, new_id, now,
    sampling_params, sse, watch_disconnect,
)
from ferroserve.errors import ApiError, from_engine_exception, from_validation, invalid, model_not_found
from ferroserve.gateway.gate import Ticket
from ferroserve.registry import Registry
from ferroserve.schemas.chat import ChatCompletionRequest, chat_decoder


def _messages(req: ChatCompletionRequest) -> list[tuple]:
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
        out.append((m.role, content))
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


async def create_chat_completion(registry: Registry, body: bytes, proto, ticket: Ticket) -> tuple[int, bytes | None, dict]:
    """Returns (status, body, log fields); body None means the SSE response was sent."""
    try:
        req = chat_decoder.decode(body)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise from_validation(exc) from None
    model = registry.get(req.model)
    if model is None or "chat" not in model.capabilities:
        raise model_not_found(req.model)
    if req.tools and req.tool_choice not in (None, "none"):
        raise invalid("Tool calling is not supported by this model yet.", param="tools")
    backend = model.backend
    try:
        prompt = backend.engine.encode_chat(_messages(req), True)
    except _core.FerroserveError as exc:
        raise from_engine_exception(exc, param="messages") from None
    top = req.top_logprobs or 0
    if top and not req.logprobs:
        raise invalid("top_logprobs requires logprobs to be true.", param="top_logprobs")
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    params = sampling_params(req, max_tokens=max_tokens, logprobs=bool(req.logprobs), top_logprobs=top)
    ticket.admit(model, len(prompt), (max_tokens or 0) * params["n"])
    request_id, collector, n_prompt, _ = backend.submit(prompt, params, stream=req.stream)
    name = model.spec.name
    cid, created = new_id("chatcmpl"), now()
    log = {"model": name, "prompt_tokens": n_prompt}
    if not req.stream:
        outcome = await collect(backend, request_id, collector, params["n"], n_prompt, proto)
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": "".join(c.text)},
                "logprobs": _logprobs_json(c.logprobs) if req.logprobs else None,
                "finish_reason": c.finish_reason,
            }
            for i, c in enumerate(outcome.choices)
        ]
        log["completion_tokens"] = outcome.completion_tokens
        log["cached_tokens"] = outcome.cached_tokens
        return 200, encode({
            "id": cid, "object": "chat.completion", "created": created, "model": name,
            "system_fingerprint": FINGERPRINT, "choices": choices, "usage": outcome.usage(),
        }), log
    await _stream(backend, request_id, collector, params["n"], n_prompt, req, cid, created, name, proto, log, ticket)
    return 200, None, log


async def _stream(backend, request_id, collector, n, n_prompt, req, cid, created, name, proto, log, ticket) -> None:
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    head = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": name, "system_fingerprint": FINGERPRINT}

    def chunk(index: int, delta: dict, finish_reason=None, logprobs=None) -> bytes:
        body = {**head, "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}]}
        if include_usage:
            body["usage"] = None
        return sse(encode(body))

    outcome = Outcome([Choice() for _ in range(n)], n_prompt)
    transport = proto.response_stream(200, [*SSE_HEADERS, *ticket.response_headers()])
    disconnect = watch_disconnect(proto, collector)
    finished = False
    try:
        await transport.send_bytes(b"".join(chunk(i, {"role": "assistant", "content": ""}) for i in range(n)))
        while not finished:
            out = []
            for event in await collector.next_batch():
                if event[0] == "x":
                    return
                try:
                    apply(outcome, event)
                except ApiError as err:
                    await transport.send_bytes(error_event(err) + DONE)
                    finished = True
                    return
                if event[0] == "d" and (event[3] or event[5]):
                    ticket.first_token()
                    lp = _logprobs_json(event[5]) if (req.logprobs and event[5]) else None
                    out.append(chunk(event[2], {"content": event[3]}, logprobs=lp))
                elif event[0] == "f":
                    out.append(chunk(event[2], {}, finish_reason=event[3]))
            finished = all(c.finish_reason is not None for c in outcome.choices)
            if finished:
                if include_usage:
                    out.append(sse(encode({**head, "choices": [], "usage": outcome.usage()})))
                out.append(DONE)
            if out:
                await transport.send_bytes(b"".join(out))
    except Exception:
        # The client went away mid-write (or the stream broke): stop generating.
        finished = False
    finally:
        # Metered even when the client left early: what was generated was generated.
        log["completion_tokens"] = outcome.completion_tokens if finished else sum(len(c.token_ids) for c in outcome.choices)
        log["cached_tokens"] = outcome.cached_tokens
        backend.finish(request_id, abort=not finished)
        if disconnect is not None:
            disconnect.cancel()
