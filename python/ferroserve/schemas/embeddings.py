"""`POST /v1/embeddings` request (the response is assembled from pre-encoded bytes)."""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from ferroserve.schemas.chat import Route, Routing


class EmbeddingRequest(msgspec.Struct, forbid_unknown_fields=False):
    model: str
    # str, list[str], list[int] or list[list[int]]: msgspec unions allow one array type,
    # so the list's elements are checked by the handler.
    input: str | list[Any]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None
    # Neural Router's routing extension; NUREV-style per-request options (`cache_mode: "bypass"`).
    route: Route | None = None
    metadata: dict[str, Any] | None = None


decoder = msgspec.json.Decoder(EmbeddingRequest)


class Embedding(msgspec.Struct, forbid_unknown_fields=True):
    object: Literal["embedding"]
    index: int
    embedding: list[float] | str  # a string: base64 of little-endian float32


class EmbeddingUsage(msgspec.Struct, forbid_unknown_fields=True):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(msgspec.Struct, forbid_unknown_fields=True):
    object: Literal["list"]
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage
    routing: Routing | None = None
