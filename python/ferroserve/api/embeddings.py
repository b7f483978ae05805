"""`POST /v1/embeddings`."""

from __future__ import annotations

import msgspec

from ferroserve.errors import invalid, model_not_found
from ferroserve.gateway.gate import Ticket
from ferroserve.registry import Registry
from ferroserve.schemas.embeddings import EmbeddingRequest, decoder

_encode = msgspec.json.Encoder().encode


def _split_input(req: EmbeddingRequest, max_inputs: int) -> tuple[list[str] | None, list[list[int]] | None]:
    """OpenAI's four input shapes -> (texts, token_lists); raises 400 on anything else."""
    value = req.input
    if isinstance(value, str):
        if not value:
            raise invalid("'input' must not be an empty string.", param="input")
        return [value], None
    if not value:
        raise invalid("'input' must not be an empty list.", param="input")
    if len(value) > max_inputs:
        raise invalid(f"'input' has {len(value)} items; at most {max_inputs} are allowed per request.", param="input")
    first = value[0]
    if isinstance(first, str):
        if not all(type(v) is str for v in value):
            raise invalid("'input' must be a string, a list of strings, a list of token ids or a list of such lists.", param="input")
        if any(not v for v in value):
            raise invalid("'input' must not contain empty strings.", param="input")
        return value, None
    if type(first) is int:
        if not all(type(v) is int and 0 <= v < 2**32 for v in value):
            raise invalid("'input' token ids must be non-negative integers.", param="input")
        return None, [value]
    if isinstance(first, list):
        for item in value:
            if not isinstance(item, list) or not all(type(v) is int and 0 <= v < 2**32 for v in item):
                raise invalid("'input' must be a list of lists of non-negative token ids.", param="input")
            if not item:
                raise invalid("'input' must not contain empty token lists.", param="input")
        return None, value
    raise invalid("'input' must be a string, a list of strings, a list of token ids or a list of such lists.", param="input")


async def create_embedding(registry: Registry, body: bytes, max_inputs: int, ticket: Ticket) -> tuple[bytes, dict]:
    """Returns the response body and log fields."""
    try:
        req = decoder.decode(body)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        from ferroserve.errors import from_validation

        raise from_validation(exc) from None
    model = registry.get(req.model)
    if model is None or "embeddings" not in model.capabilities:
        raise model_not_found(req.model)
    if req.dimensions is not None and not 1 <= req.dimensions <= (model.dimensions or 0):
        raise invalid(f"'dimensions' must be between 1 and {model.dimensions} for {model.spec.name}.", param="dimensions")
    texts, token_lists = _split_input(req, max_inputs)
    # Limits and budgets are checked with the exact prompt tokens before the call; counting
    # costs a second tokenization, so only when a limit or budget applies.
    ticket.admit(model, prompt_tokens=model.backend.count_tokens(texts, token_lists) if ticket.needs_prompt_tokens(model) else 0)
    result = await model.backend.embed(
        texts=texts,
        token_lists=token_lists,
        dimensions=req.dimensions,
        base64=req.encoding_format == "base64",
    )
    n = result.prompt_tokens
    body = b"".join(
        (
            b'{"object":"list","data":',
            result.data_json,
            b',"model":',
            _encode(model.spec.name),
            b',"usage":{"prompt_tokens":%d,"total_tokens":%d}}' % (n, n),
        )
    )
    return body, {"model": model.spec.name, "prompt_tokens": n}
