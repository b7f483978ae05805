"""`POST /v1/embeddings`: routed like generations, answered from the embedding cache when the
same content was embedded within the cache's lifetime."""

from __future__ import annotations

import msgspec

from ferroserve.backends.base import EmbedRequest
from ferroserve.errors import from_validation, invalid
from ferroserve.gateway.embed_cache import EmbedCache
from ferroserve.gateway.gate import Ticket
from ferroserve.gateway.router import Router
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


def _body(data_json: bytes, name: str, n: int) -> bytes:
    return b"".join((
        b'{"object":"list","data":', data_json, b',"model":', _encode(name),
        b',"usage":{"prompt_tokens":%d,"total_tokens":%d}}' % (n, n),
    ))


async def create_embedding(router: Router, body: bytes, max_inputs: int, ticket: Ticket,
                           cache: EmbedCache | None, priority: str = "interactive") -> tuple[bytes, dict, list[tuple[str, str]]]:
    """Returns the response body, log fields and extra response headers."""
    try:
        req = decoder.decode(body)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise from_validation(exc) from None
    router.require(req.model, "embeddings")
    plan = router.plan(req.model, "embeddings", req.route)
    ticket.restrict(plan)
    first = plan.candidates[0]
    if req.dimensions is not None and not 1 <= req.dimensions <= (first.dimensions or 0):
        raise invalid(f"'dimensions' must be between 1 and {first.dimensions} for {first.spec.name}.", param="dimensions")
    texts, token_lists = _split_input(req, max_inputs)
    request = EmbedRequest(texts=texts, token_lists=token_lists, dimensions=req.dimensions, encoding=req.encoding_format,
                           priority=priority)
    cache_mode = (req.metadata or {}).get("cache_mode", "default")
    if cache_mode not in ("default", "bypass"):
        raise invalid("metadata.cache_mode must be \"default\" or \"bypass\".", param="metadata")
    bypass = cache_mode == "bypass"
    key = None
    if cache is not None and not bypass and plan.named is not None:
        key = cache.key(plan.named.spec.name, texts, token_lists, req.dimensions, req.encoding_format)
        hit = cache.get(key)
        if hit is not None:
            data_json, n = hit
            # Metered as any request: limits, budget and usage apply to a hit.
            ticket.admit(plan.named, n)
            ticket.cache_hit = True
            name = plan.named.spec.name
            return _body(data_json, name, n), {"model": name, "prompt_tokens": n, "cache": "hit"}, [("x-ferroserve-cache", "hit")]
    # Limits and budgets are checked with the exact prompt tokens before the call; counting
    # costs a second tokenization, so only when a limit or budget applies. With Redis the
    # verdict may travel while the vectors are computed (`ahead`): an embedding is answered
    # only after `confirm`, and one Redis refuses is dropped unsent and uncharged.
    ticket.admit(first, prompt_tokens=first.backend.count_embed_tokens(request) if ticket.needs_prompt_tokens(first) else 0,
                 ahead=True)
    model, result = await router.embed(plan, request)
    ticket.confirm()
    ticket.served(model, plan)
    data_json = result.data_json(req.encoding_format)
    n = result.prompt_tokens
    if key is not None and cache is not None:
        cache.put(key, data_json, n)
    name = plan.response_model_name()
    log = {"model": model.spec.name, "prompt_tokens": n, "backend": model.info.backend}
    if plan.tried:
        log["fallbacks"] = plan.tried
    out = _body(data_json, name, n)
    if plan.routed:
        out = out[:-1] + b',"routing":' + _encode(plan.routing()) + b"}"
    headers = [("x-ferroserve-cache", "bypass" if bypass else "miss")] if cache is not None else []
    return out, log, headers
