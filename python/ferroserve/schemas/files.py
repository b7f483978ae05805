"""Files, OpenAI batches and NUREV's embedding batches: responses (see schemas/chat.py on how
these are kept true)."""

from __future__ import annotations

from typing import Any, Literal

import msgspec


class FileObject(msgspec.Struct, forbid_unknown_fields=True):
    id: str
    object: Literal["file"]
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: Literal["processed"]
    expires_at: int | None
    status_details: str | None


class FileList(msgspec.Struct, forbid_unknown_fields=True):
    object: Literal["list"]
    data: list[FileObject]
    first_id: str | None
    last_id: str | None
    has_more: bool


class FileDeleted(msgspec.Struct, forbid_unknown_fields=True):
    id: str
    object: Literal["file"]
    deleted: bool


class RequestCounts(msgspec.Struct, forbid_unknown_fields=True):
    total: int | None
    completed: int
    failed: int


class Batch(msgspec.Struct, forbid_unknown_fields=True):
    """OpenAI's batch object."""

    id: str
    object: Literal["batch"]
    endpoint: str
    errors: dict[str, Any] | None
    input_file_id: str | None
    completion_window: str | None
    status: Literal["validating", "in_progress", "finalizing", "completed", "failed", "expired", "cancelling", "cancelled"]
    output_file_id: str | None
    error_file_id: str | None
    created_at: int
    in_progress_at: int | None
    expires_at: int | None
    finalizing_at: int | None
    completed_at: int | None
    failed_at: int | None
    expired_at: int | None
    cancelling_at: int | None
    cancelled_at: int | None
    request_counts: RequestCounts
    metadata: dict[str, str] | None


class BatchList(msgspec.Struct, forbid_unknown_fields=True):
    object: Literal["list"]
    data: list[Batch]
    first_id: str | None
    last_id: str | None
    has_more: bool


class EmbeddingBatch(msgspec.Struct, forbid_unknown_fields=True):
    """NUREV's embedding batch."""

    id: str
    object: Literal["batch"]
    status: Literal["pending", "processing", "completed", "failed", "cancelled"]
    model: str
    total_jobs: int
    completed_jobs: int
    failed_jobs: int
    total_tokens: int
    created_at: str
    completed_at: str | None


class ResultsUrl(msgspec.Struct, forbid_unknown_fields=True):
    url: str
    expires_at: str


class WebhookDelivery(msgspec.Struct, forbid_unknown_fields=True):
    id: str
    object: Literal["webhook_delivery"]
    attempt: int
    event: str
    url: str
    status_code: int | None
    error: str | None
    delivered: bool
    duration_ms: float | None
    created_at: str


class WebhookDeliveryList(msgspec.Struct, forbid_unknown_fields=True):
    object: Literal["list"]
    data: list[WebhookDelivery]
