"""Gateway responses: usage, request history, API keys, estimates (see schemas/chat.py on how
these are kept true)."""

from __future__ import annotations

from typing import Literal

import msgspec


class TokenDetails(msgspec.Struct, forbid_unknown_fields=True):
    cached_input_tokens: int
    total_tokens: int


class UsageRecord(msgspec.Struct, forbid_unknown_fields=True):
    """One request's usage: IPOP's `UsageRecord` plus our columns."""

    request_id: str
    created_at: str
    model: str | None
    route: str
    key_id: str | None
    workspace: str | None
    backend: str | None
    cache_hit: bool
    fallbacks: list[str]
    status: int
    tokens_in: int
    tokens_out: int
    token_details: TokenDetails
    cost: float
    provider_billed: bool
    duration_ms: int
    latency_ms: float


class UsageGroup(msgspec.Struct, forbid_unknown_fields=True):
    key: str | None
    requests: int
    tokens_in: int
    tokens_out: int
    cached_tokens: int
    cost: float


class UsageSummary(msgspec.Struct, forbid_unknown_fields=True):
    object: Literal["usage"]
    workspace: str | None
    start: str | None
    end: str | None
    model: str | None
    total_requests: int
    total_tokens_in: int
    total_tokens_out: int
    total_cached_tokens: int
    total_cost: float
    records: list[UsageRecord]
    group_by: Literal["day", "model"] | None = None
    groups: list[UsageGroup] = []


class HistoryRecord(msgspec.Struct, forbid_unknown_fields=True):
    request_id: str
    model: str | None
    execution_kind: str
    status: Literal["completed", "failed"]
    http_status: int
    error: str | None
    tokens_in: int
    tokens_out: int
    token_details: TokenDetails
    cost: float
    backend: str | None
    cache_hit: bool
    fallbacks: list[str]
    key_id: str | None
    workspace: str | None
    latency_ms: float
    ttft_ms: float | None
    created_at: str
    started_at: str
    completed_at: str
    updated_at: str
    request_body: str | None = None  # only when the workspace captures prompts


class HistoryList(msgspec.Struct, forbid_unknown_fields=True):
    object: Literal["list"]
    data: list[HistoryRecord]


class ApiKeyObject(msgspec.Struct, forbid_unknown_fields=True):
    id: str
    object: Literal["api_key"]
    workspace: str
    hint: str
    rpm: int | None
    tpm: int | None
    models: list[str] | None
    expires_at: float | None
    admin: bool
    created_at: float
    revoked_at: float | None
    status: Literal["active", "revoked", "expired"]
    key: str | None = None  # the secret: in the answer to its creation only


class ApiKeyList(msgspec.Struct, forbid_unknown_fields=True):
    object: Literal["list"]
    data: list[ApiKeyObject]


class EstimateResponse(msgspec.Struct, forbid_unknown_fields=True):
    """IPOP's `EstimateResponse`."""

    object: Literal["ipop.estimate"]
    model: str
    kind: Literal["chat", "embeddings"]
    estimated_prompt_tokens: int
    estimated_completion_tokens: int
    estimated_total_tokens: int
    estimated_cost_usd: float
    input_token_rate: float
    output_token_rate: float
    within_context_window: bool
    max_input_tokens: int
    max_output_tokens: int
    warnings: list[str]
