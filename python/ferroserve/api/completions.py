"""`POST /v1/completions` (plain and SSE streaming); several prompts run as separate
requests (each routed on its own) and come back as one response (choice index = prompt · n + j)."""

from __future__ import annotations

import asyncio

import msgspec

from ferroserve.api.generate import (
    DONE, FINGERPRINT, SSE_HEADERS, U32_MAX, Choice, Disconnect, Outcome, ProtocolClosed, apply, cut_by_shutdown, encode,
    end_cut_stream, error_event, failure_error, max_tokens_of, new_id, now, route_fields, sampling_params, shutdown_error, sse,
    start_generation, stream_status,
)
from ferroserve.backends.base import ChatRequest, Delta, Failed, Finished, estimate_tokens
from ferroserve.errors import ApiError, from_validation, invalid
from ferroserve.gateway.gate import Ticket
from ferroserve.gateway.router import Router
from ferroserve.schemas.chat import CompletionRequest, completion_decoder


def _prompts(req: CompletionRequest) -> list[str | list[int]]:
    p = req.prompt
    if isinstance(p, str):
        return [p]
    if not p:
        raise invalid("prompt must not be empty.", param="prompt")
    if all(type(t) is int for t in p):
        return [_token_ids(p)]
    if all(isinstance(t, str) for t in p):
        return list(p)
    if all(isinstance(t, list) and all(type(x) is int for x in t) for t in p):
        return [_token_ids(t) for t in p]
    raise invalid("prompt must be a string, a list of strings, a list of token ids or a list of such lists.", param="prompt")


def _token_ids(ids: list[int]) -> list[int]:
    # Ids past the vocabulary are the engine's to refuse; ids no token can have are refused here.
    if not all(0 <= t <= U32_MAX for t in ids):
        raise invalid("prompt token ids must be non-negative integers.", param="prompt")
    return list(ids)


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


async def create_completion(router: Router, body: bytes, proto, ticket: Ticket,
                            priority: str = "interactive") -> tuple[int, bytes | None, dict]:
    try:
        req = completion_decoder.decode(body)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise from_validation(exc) from None
    router.require(req.model, "completions")
    if req.echo:
        raise invalid("echo is not supported.", param="echo")
    if req.suffix:
        raise invalid("suffix is not supported by this model.", param="suffix")
    if req.best_of not in (None, 1):
        raise invalid("best_of is not supported.", param="best_of")
    top = req.logprobs or 0
    if not 0 <= top <= 5:
        raise invalid("logprobs must be between 0 and 5.", param="logprobs")
    # OpenAI's default for /v1/completions is 16 tokens.
    max_tokens = max_tokens_of(router, req.max_tokens, "max_tokens", default=16)
    params = sampling_params(req, max_tokens=max_tokens, logprobs=req.logprobs is not None, top_logprobs=top)
    n = params.n
    requests = [ChatRequest(prompt=p, params=params, stream=req.stream, priority=priority) for p in _prompts(req)]
    plans = [router.plan(req.model, "completions", req.route, prompt_tokens_hint=estimate_tokens(r), max_tokens=max_tokens)
             for r in requests]
    ticket.admit_plan(plans, requests, max_tokens * n * len(requests))
    cid, created = new_id("cmpl"), now()
    log: dict = {"model": plans[0].candidates[0].spec.name}
    outcomes = [Outcome([Choice() for _ in range(n)], 0) for _ in requests]
    started: list = []

    def usage_fields() -> None:
        # Metered even when the client left early: what was generated was generated.
        log["prompt_tokens"] = sum(o.prompt_tokens for o in outcomes)
        log["completion_tokens"] = sum(o.completion_tokens if o.finished else o.generated_tokens for o in outcomes)
        log["cached_tokens"] = sum(o.cached_tokens for o in outcomes)
        if plans[0].served_by is not None:
            ticket.served(plans[0].served_by, plans[0])
            route_fields(plans[0], log)

    try:
        with Disconnect(proto):
            for plan, r in zip(plans, requests):
                started.append((await start_generation(router, plan, r, ticket))[1])
            route_fields(plans[0], log)
            name = plans[0].response_model_name()
            if req.stream:
                await _stream(started, outcomes, n, req, cid, created, name, plans[0], proto, ticket, log, usage_fields)
                return stream_status(log), None, log

            async def run(events, outcome):
                async for ev in events:
                    apply(outcome, ev)

            await asyncio.gather(*(run(e, o) for e, o in zip(started, outcomes)))
            choices = []
            for pi, outcome in enumerate(outcomes):
                for j, c in enumerate(outcome.choices):
                    choices.append({
                        "index": pi * n + j,
                        "text": "".join(c.text),
                        "logprobs": _logprobs_json(c.logprobs) if req.logprobs is not None else None,
                        "finish_reason": c.finish_reason,
                    })
            out = {"id": cid, "object": "text_completion", "created": created, "model": name,
                   "system_fingerprint": FINGERPRINT, "choices": choices, "usage": _usage(outcomes)}
            if plans[0].routed:
                out["routing"] = plans[0].routing()
            return 200, encode(out), log
        log["client_disconnected"] = True
        return 499, None, log
    finally:
        usage_fields()
        for events in started:
            await events.aclose()


def _usage(outcomes: list[Outcome]) -> dict:
    p = sum(o.prompt_tokens for o in outcomes)
    c = sum(o.completion_tokens for o in outcomes)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c,
            "prompt_tokens_details": {"cached_tokens": sum(o.cached_tokens for o in outcomes)}}


async def _stream(started, outcomes, n, req, cid, created, name, plan, proto, ticket, log, usage_fields) -> None:
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    head = {"id": cid, "object": "text_completion", "created": created, "model": name, "system_fingerprint": FINGERPRINT}
    transport = proto.response_stream(200, [*SSE_HEADERS, *ticket.response_headers()])

    def chunk(index: int, text: str, finish_reason=None, logprobs=None, routing=None) -> bytes:
        body = {**head, "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}]}
        if routing is not None:
            body["routing"] = routing
        if include_usage:
            body["usage"] = None
        return sse(encode(body))

    if plan.routed:
        await transport.send_bytes(chunk(0, "", routing=plan.routing()))

    async def pump(pi: int, events, outcome: Outcome) -> None:
        async for ev in events:
            t = type(ev)
            if t is Failed:
                raise failure_error(ev.error)
            apply(outcome, ev)
            if t is Delta:
                if ev.text or ev.logprobs:
                    ticket.first_token()
                    lp = _logprobs_json(ev.logprobs) if (req.logprobs is not None and ev.logprobs) else None
                    await transport.send_bytes(chunk(pi * n + ev.index, ev.text, logprobs=lp))
            elif t is Finished:
                await transport.send_bytes(chunk(pi * n + ev.index, "", finish_reason=ev.reason))

    try:
        await asyncio.gather(*(pump(pi, e, o) for pi, (e, o) in enumerate(zip(started, outcomes))))
        tail = []
        if include_usage:
            tail.append(sse(encode({**head, "choices": [], "usage": _usage(outcomes)})))
        tail.append(DONE)
        usage_fields()
        await ticket.finish(200, log)  # the usage is committed before the last byte
        await transport.send_bytes(b"".join(tail))
    except ApiError as err:
        try:
            usage_fields()
            await ticket.finish(200, log)
            await transport.send_bytes(error_event(err) + DONE)
        except ProtocolClosed:
            log["client_disconnected"] = True
    except ProtocolClosed:
        log["client_disconnected"] = True  # the client went away mid-write: stop generating
    except asyncio.CancelledError as exc:
        if not cut_by_shutdown(exc):
            raise
        await end_cut_stream(transport, error_event(shutdown_error()) + DONE, log)
    except Exception:
        pass  # the stream broke: what was sent stands
