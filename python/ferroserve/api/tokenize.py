"""`POST /v1/tokenize` and `POST /v1/detokenize` (vLLM's shapes)."""

from __future__ import annotations

import msgspec

from ferroserve import _core
from ferroserve.api.chat import _messages
from ferroserve.errors import from_engine_exception, from_validation, invalid, model_not_found
from ferroserve.gateway.gate import Ticket
from ferroserve.registry import Registry
from ferroserve.schemas.chat import detokenize_decoder, tokenize_decoder

_encode = msgspec.json.Encoder().encode


def _chat_model(registry: Registry, name: str, ticket: Ticket):
    model = registry.get(name)
    if model is None or "chat" not in model.capabilities:
        raise model_not_found(name)
    ticket.allow(model)
    return model


def tokenize(registry: Registry, body: bytes, ticket: Ticket) -> bytes:
    try:
        req = tokenize_decoder.decode(body)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise from_validation(exc) from None
    model = _chat_model(registry, req.model, ticket)
    engine = model.backend.engine
    if (req.prompt is None) == (req.messages is None):
        raise invalid("Give exactly one of prompt or messages.", param="prompt")
    try:
        if req.prompt is not None:
            tokens = engine.encode(req.prompt, req.add_special_tokens, True)
        else:
            tokens = engine.encode_chat(_messages(req), req.add_generation_prompt)
    except _core.FerroserveError as exc:
        raise from_engine_exception(exc, param="prompt" if req.prompt is not None else "messages") from None
    return _encode({"tokens": tokens, "count": len(tokens), "max_model_len": engine.context_length})


def detokenize(registry: Registry, body: bytes, ticket: Ticket) -> bytes:
    try:
        req = detokenize_decoder.decode(body)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise from_validation(exc) from None
    model = _chat_model(registry, req.model, ticket)
    engine = model.backend.engine
    if any(t < 0 or t >= engine.vocab_size for t in req.tokens):
        raise invalid(f"tokens must be ids below the vocabulary size {engine.vocab_size}.", param="tokens")
    try:
        return _encode({"prompt": engine.decode(req.tokens, False)})
    except _core.FerroserveError as exc:
        raise from_engine_exception(exc, param="tokens") from None
