"""`POST /v1/estimate`: prompt tokens, expected completion tokens, cost, and whether the
request fits the context window, without running the model (IPOP's `EstimateResponse`)."""

from __future__ import annotations

import math

import msgspec

from ferroserve.api.chat import messages_of
from ferroserve.backends.base import ChatRequest, SamplingParams
from ferroserve.errors import from_validation, invalid, model_not_found
from ferroserve.gateway.gate import Ticket
from ferroserve.registry import Registry
from ferroserve.schemas.chat import ChatMessage

_encode = msgspec.json.Encoder().encode


class EstimateRequest(msgspec.Struct, forbid_unknown_fields=False):
    model: str
    messages: list[ChatMessage] | None = None
    prompt: str | list[str] | None = None
    input: str | list[str] | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    n: int = 1


_decoder = msgspec.json.Decoder(EstimateRequest)


def spec_name(model) -> str:
    return model.spec.name


def estimate(registry: Registry, body: bytes, ticket: Ticket) -> bytes:
    try:
        req = _decoder.decode(body)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise from_validation(exc) from None
    model = registry.get(req.model)
    if model is None:
        raise model_not_found(req.model)
    ticket.allow(model)
    given = [f for f in ("messages", "prompt", "input") if getattr(req, f) is not None]
    if len(given) != 1:
        raise invalid("Give exactly one of messages, prompt or input.", param="messages")
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    if max_tokens is not None and max_tokens < 1:
        raise invalid("max_tokens must be at least 1.", param="max_tokens")
    if req.n < 1:
        raise invalid("n must be at least 1.", param="n")
    warnings: list[str] = []
    source = req.input if req.input is not None else req.prompt
    texts: list[str] = [source] if isinstance(source, str) else list(source or [])
    context = model.context_length
    if "chat" in model.capabilities:
        kind = "chat"
        backend = model.backend
        if req.messages is not None:
            prompt_tokens = backend.count_tokens(ChatRequest(messages=messages_of(req), params=SamplingParams()))
        else:
            prompt_tokens = sum(backend.count_tokens(ChatRequest(prompt=t, params=SamplingParams())) for t in texts)
        if model.backend.tokenizer() is None:
            warnings.append(f"prompt tokens are estimated (about 4 bytes per token): {spec_name(model)} runs on "
                            f"backend {model.info.backend}, whose tokenizer is not here.")
        context = context or prompt_tokens + (max_tokens or 0)
        if max_tokens is None:
            completion = max(0, context - prompt_tokens)
            warnings.append("max_tokens not given: the completion estimate is the most the context window allows.")
        else:
            completion = max_tokens
        completion *= req.n
        fits = prompt_tokens + (max_tokens or 0) <= context
    else:
        kind = "embeddings"
        if req.messages is not None:
            raise invalid("Embedding models take input, not messages.", param="messages")
        # The embedding engine tokenizes inside Rust and has no separate tokenizer call yet:
        # about four bytes per token plus the two special tokens, per input.
        prompt_tokens = sum(math.ceil(len(t.encode()) / 4) + 2 for t in texts)
        warnings.append("embedding prompt tokens are estimated from text length (about 4 bytes per token).")
        completion = 0
        fits = context is None or all(math.ceil(len(t.encode()) / 4) + 2 <= context for t in texts)
    spec = model.spec
    cost = (prompt_tokens * spec.input_usd_per_million_tokens + completion * spec.output_usd_per_million_tokens) / 1e6
    if not fits:
        warnings.append(f"the request does not fit the model's context window of {context} tokens.")
    return _encode({
        "object": "ipop.estimate",
        "model": spec.name,
        "kind": kind,
        "estimated_prompt_tokens": prompt_tokens,
        "estimated_completion_tokens": completion,
        "estimated_total_tokens": prompt_tokens + completion,
        "estimated_cost_usd": cost,
        "input_token_rate": spec.input_usd_per_million_tokens,
        "output_token_rate": spec.output_usd_per_million_tokens,
        "within_context_window": fits,
        "max_input_tokens": context or 0,
        "max_output_tokens": (context or 0) if kind == "chat" else 0,
        "warnings": warnings,
    })
