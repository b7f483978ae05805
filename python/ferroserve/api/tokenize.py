"""`POST /v1/tokenize` and `POST /v1/detokenize` (vLLM's shapes): local chat models only (a
remote model's tokenizer is not here)."""

from __future__ import annotations

import msgspec

from ferroserve.api.chat import messages_of
from ferroserve.errors import from_validation, invalid, model_not_found
from ferroserve.gateway.gate import Ticket
from ferroserve.registry import Registry
from ferroserve.schemas.chat import detokenize_decoder, tokenize_decoder

_encode = msgspec.json.Encoder().encode


def _chat_model(registry: Registry, name: str, ticket: Ticket):
    model = registry.get(name)
    if model is None or "chat" not in model.capabilities:
        raise model_not_found(name)
    ticket.allow(model)
    tokenizer = model.backend.tokenizer()
    if tokenizer is None:
        raise invalid(f"The model `{model.spec.name}` is served by backend `{model.info.backend}`, whose tokenizer is "
                      "not available here.", param="model", code="model_not_supported")
    return model, tokenizer


def tokenize(registry: Registry, body: bytes, ticket: Ticket) -> bytes:
    try:
        req = tokenize_decoder.decode(body)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise from_validation(exc) from None
    model, tok = _chat_model(registry, req.model, ticket)
    if (req.prompt is None) == (req.messages is None):
        raise invalid("Give exactly one of prompt or messages.", param="prompt")
    if req.prompt is not None:
        tokens = tok.encode_text(req.prompt, req.add_special_tokens)
    else:
        tokens = tok.encode_messages(messages_of(req), req.add_generation_prompt)
    return _encode({"tokens": tokens, "count": len(tokens), "max_model_len": model.context_length})


def detokenize(registry: Registry, body: bytes, ticket: Ticket) -> bytes:
    try:
        req = detokenize_decoder.decode(body)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise from_validation(exc) from None
    _, tok = _chat_model(registry, req.model, ticket)
    if any(t < 0 or t >= tok.vocab_size for t in req.tokens):
        raise invalid(f"tokens must be ids below the vocabulary size {tok.vocab_size}.", param="tokens")
    return _encode({"prompt": tok.decode_ids(req.tokens)})
