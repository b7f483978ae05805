"""`/health`, `/v1/ready` and `/v1/status` responses (see schemas/chat.py on how these are kept true)."""

from __future__ import annotations

from typing import Literal

import msgspec

from ferroserve.backends.base import BackendStats


class Health(msgspec.Struct, forbid_unknown_fields=True):
    status: Literal["ok"]


class Ready(msgspec.Struct, forbid_unknown_fields=True):
    status: Literal["ready"]
    models: list[str]


class RouterHealth(msgspec.Struct, forbid_unknown_fields=True):
    breaker: str
    consecutive_failures: int
    error_rate: float
    requests: int
    failures: int
    ewma_latency_ms: float | None
    ewma_ttft_ms: float | None
    ewma_tokens_per_s: float | None


class ModelStatus(msgspec.Struct, forbid_unknown_fields=True):
    """IPOP's `PublicStatus` model entry, plus the backend, router health and load."""

    id: str
    display_name: str
    available: bool
    status: Literal["available", "unavailable"]
    supports_chat: bool
    supports_embeddings: bool
    supports_tools: bool
    supports_vision: bool
    supports_json_schema: bool
    supports_reasoning: bool
    latency_class: str
    backend: str
    backend_kind: str
    health: Literal["healthy", "degraded", "down"]
    router: RouterHealth
    load: BackendStats
    # Why the model's engine in this process stopped (only then).
    error: str | None = None


class EmbedCacheStats(msgspec.Struct, forbid_unknown_fields=True):
    entries: int
    bytes: int
    max_bytes: int
    hits: int
    misses: int
    evictions: int


class PublicStatus(msgspec.Struct, forbid_unknown_fields=True):
    object: Literal["ipop.status"]
    status: Literal["available", "degraded", "not_enabled"]
    generated_at_unix: int
    models: list[ModelStatus]
    embed_cache: EmbedCacheStats | None = None
