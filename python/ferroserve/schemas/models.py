"""`GET /v1/models` wire types."""

from __future__ import annotations

import msgspec


class ModelCard(msgspec.Struct, omit_defaults=True, forbid_unknown_fields=True):
    id: str
    object: str  # always "model"; no default so it is never omitted
    created: int
    owned_by: str
    # USD per million input / output tokens (the neural-router spec's names); no default, so
    # they are shown even when 0.
    input_per_m: float
    output_per_m: float
    # Who serves it: "local" (this process) or a [[backends]] name, its kind, and the router's
    # live view: healthy / degraded / down.
    provider: str
    backend_kind: str
    health: str
    context_length: int | None = None
    capabilities: list[str] = []
    aliases: list[str] = []
    dimensions: int | None = None
    device: str | None = None
    context_window: int | None = None  # Neural Router's name for context_length
    fallbacks: list[str] = []
    quality: float | None = None


class ModelList(msgspec.Struct, forbid_unknown_fields=True):
    data: list[ModelCard]
    object: str = "list"
