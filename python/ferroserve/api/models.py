"""`GET /v1/models` and `GET /v1/models/{id}`: every model of every backend, with its provider,
prices, context window and live health."""

from __future__ import annotations

import msgspec

from ferroserve.errors import model_not_found
from ferroserve.gateway.router import health_of
from ferroserve.registry import Registry
from ferroserve.schemas.models import ModelCard, ModelList

_encode = msgspec.json.Encoder().encode


def card(registry: Registry, name: str) -> ModelCard:
    m = registry.models[name]
    spec = m.spec
    return ModelCard(
        id=spec.name,
        object="model",
        created=m.created,
        owned_by=spec.owned_by,
        provider=m.info.backend,
        backend_kind=m.info.kind,
        health=health_of(m),
        context_length=m.context_length,
        context_window=m.context_length,
        capabilities=m.capabilities,
        aliases=list(spec.aliases),
        dimensions=m.dimensions,
        device=m.device,
        input_per_m=spec.input_usd_per_million_tokens,
        output_per_m=spec.output_usd_per_million_tokens,
        fallbacks=list(spec.fallbacks),
        quality=spec.quality,
    )


def list_models(registry: Registry) -> bytes:
    return _encode(ModelList(data=[card(registry, name) for name in registry.models]))


def get_model(registry: Registry, model_id: str) -> bytes:
    name = registry.resolve_name(model_id)
    if name is None:
        raise model_not_found(model_id)
    return _encode(card(registry, name))
