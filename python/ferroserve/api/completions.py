"""`POST /v1/completions` (plain and SSE streaming); several prompts run as separate
engine requests and come back as one response (choice index = prompt · n + j)."""

from __future__ import annotations

import asyncio

import msgspec

from ferroserve import _core
from ferroserve.api.generate import (
    DONE, FINGERPRINT, SSE_HEADERS, Choice, Outcome, apply, collect, encode, error_event, new_id, now,
    sampling_params, sse, watch_disconnect,
)
from ferroserve.errors import ApiError, from_engine_exception, from_validation, invalid, model_not_found
from ferroserve.gateway.gate import Ticket
from ferroserve.registry import Registry
from ferroserve.schemas.chat import CompletionRequest, completion_decoder


def _prompts(req: CompletionRequest, engine) -> list[list[int]]:
    p = req.prompt
    try:
        if isinstance(p, str):
            return [engine.encode(p, True, True)]
        if not p:
            raise invalid("prompt must not be empty.", param="prompt")
        if all(type(t) is int for t in p):
            return [list(p)]
        if all(isinstance(t, str) for t in p):
            return [engine.encode(t, True, True) for t in p]
        if all(isinstance(t, list) and all(type(x) is int for x in t) for t in p):
            return [list(t) for t in p]
    except _core.FerroserveError as exc:
        raise from_engine_exception(exc, param="prompt") from None
    raise invalid("prompt must be a string, a list of strings, a list of token ids or a list of such lists.", param="prompt")


def _logprobs_json(entries: list[tuple]) -> dict:
    tokens, lps, tops, offsets = [], [], [], []
    offset = 0
    for _, b, lp, top in entries:
        t = b.decode("utf-8", errors="replace")
        tokens.append(t)
        lps.append(lp)
        tops.append({tb.decode("utf-8", errors="replace"): tlp for (_, tb, tlp) in top})
        offsets.append(offset)
        offset += len(t)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


async def create_completion(registry: Registry, body: bytes, proto, ticket: Ticket) -> tuple[int, bytes | None, dict]:
    try:
        req = completion_decoder.decode(body)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise from_validation(exc) from None
    model = registry.get(req.model)
    if model is None or "completions" not in model.capabilities:
        raise model_not_found(req.model)
    if req.echo:
        raise invalid("echo is not supported.", param="echo")
    if req.suffix:
        raise invalid("suffix is not supported by this model.", param="suffix")
    if req.best_of not in (None, 1):
        raise invalid("best_of is not supported.", param="best_of")
    top = req.logprobs or 0
    if not 0 <= top <= 5:
        raise invalid("logprobs must be between 0 and 5.", param="logprobs")
    backend = model.backend
    prompts = _prompts(req, backend.engine)
    # OpenAI's default for /v1/completions is 16 tokens.
    max_tokens = 16 if req.max_tokens is None else req.max_tokens
    params = sampling_params(req, max_tokens=max_tokens, logprobs=req.logprobs is not None, top_logprobs=top)
    n = params["n"]
    ticket.admit(model, sum(len(p) for p in prompts), max_tokens * n * len(prompts))
    submitted = []
    try:
        for p in prompts:
            submitted.append(backend.submit(p, params, stream=req.stream))
    except ApiError:
        for rid, *_ in submitted:
            backend.finish(rid, abort=True)
        raise
    name = model.spec.name
    cid, created = new_id("cmpl"), now()
    n_prompt = sum(s[2] for s in submitted)
    log = {"model": name, "prompt_tokens": n_prompt}
    if req.stream:
        await _stream(backend, submitted, n, req, cid, created, name, proto, log, ticket)
        return 200, None, log
    try:
        outcomes = await asyncio.gather(*(collect(backend, rid, col, n, np_, proto) for rid, col, np_, _ in submitted))
    except BaseException:
        for rid, *_ in submitted:
            backend.finish(rid, abort=True)
        raise
    choices = []
    usage = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0, "prompt_tokens_details": {"cached_tokens": 0}}
    for pi, outcome in enumerate(outcomes):
        for j, c in enumerate(outcome.choices):
            choices.append({
                "index": pi * n + j,
                "text": "".join(c.text),
                "logprobs": _logprobs_json(c.logprobs) if req.logprobs is not None else None,
                "finish_reason": c.finish_reason,
            })
        u = outcome.usage()
        for k in ("prompt_tokens", "completion_tokens", "total_tokens"):
            usage[k] += u[k]
        usage["prompt_tokens_details"]["cached_tokens"] += u["prompt_tokens_details"]["cached_tokens"]
    log["completion_tokens"] = usage["completion_tokens"]
    log["cached_tokens"] = usage["prompt_tokens_details"]["cached_tokens"]
    return 200, encode({
        "id": cid, "object": "text_completion", "created": created, "model": name,
        "system_fingerprint": FINGERPRINT, "choices": choices, "usage": usage,
    }), log


async def _stream(backend, submitted, n, req, cid, created, name, proto, log, ticket) -> None:
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    head = {"id": cid, "object": "text_completion", "created": created, "model": name, "system_fingerprint": FINGERPRINT}
    # One merged queue: every request's collector wakes this handler.
    outcomes = {rid: (pi, Outcome([Choice() for _ in range(n)], np_)) for pi, (rid, _, np_, _) in enumerate(submitted)}
    transport = proto.response_stream(200, [*SSE_HEADERS, *ticket.response_headers()])
    disconnects = [watch_disconnect(proto, col) for _, col, _, _ in submitted]
    done: set[int] = set()

    def chunk(index: int, text: str, finish_reason=None, logprobs=None) -> bytes:
        body = {**head, "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}]}
        if include_usage:
            body["usage"] = None
        return sse(encode(body))

    async def pump(rid, col):
        pi, outcome = outcomes[rid]
        while True:
            out = []
            for event in await col.next_batch():
                if event[0] == "x":
                    raise ConnectionError("client disconnected")
                apply(outcome, event)
                if event[0] == "d" and (event[3] or event[5]):
                    ticket.first_token()
                    lp = _logprobs_json(event[5]) if (req.logprobs is not None and event[5]) else None
                    out.append(chunk(pi * n + event[2], event[3], logprobs=lp))
                elif event[0] == "f":
                    out.append(chunk(pi * n + event[2], "", finish_reason=event[3]))
            if out:
                await transport.send_bytes(b"".join(out))
            if all(c.finish_reason is not None for c in outcome.choices):
                done.add(rid)
                return

    try:
        await asyncio.gather(*(pump(rid, col) for rid, col, _, _ in submitted))
        tail = []
        if include_usage:
            p = sum(o.prompt_tokens for _, o in outcomes.values())
            c = sum(o.completion_tokens for _, o in outcomes.values())
            cached = sum(o.cached_tokens for _, o in outcomes.values())
            tail.append(sse(encode({**head, "choices": [], "usage": {
                "prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c,
                "prompt_tokens_details": {"cached_tokens": cached}}})))
        tail.append(DONE)
        await transport.send_bytes(b"".join(tail))
    except ApiError as err:
        try:
            await transport.send_bytes(error_event(err) + DONE)
        except Exception:
            pass
    except Exception:
        pass  # client gone
    finally:
        # Metered even when the client left early: what was generated was generated.
        log["completion_tokens"] = sum(
            o.completion_tokens if rid in done else sum(len(c.token_ids) for c in o.choices) for rid, (_, o) in outcomes.items())
        log["cached_tokens"] = sum(o.cached_tokens for _, o in outcomes.values())
        for rid, *_ in submitted:
            backend.finish(rid, abort=rid not in done)
        for d in disconnects:
            if d is not None:
                d.cancel()
