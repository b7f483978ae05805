"""Responses API requests (`POST /v1/responses`, `POST /v1/responses/input_tokens`).

The body is decoded to a dict first, so that every field OpenAI defines and we cannot honour is
a 400 naming it (`refused_fields`) and a field nobody defines is a 400 too; then converted to
these Structs for the types."""

from __future__ import annotations

from typing import Any

import msgspec

from ferroserve.schemas.chat import Route


class ResponseCreateRequest(msgspec.Struct, kw_only=True):
    model: str
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    text: dict[str, Any] | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    store: bool | None = None
    previous_response_id: str | None = None
    background: bool | None = None
    stream: bool | None = None
    metadata: dict[str, str] | None = None
    parallel_tool_calls: bool | None = None
    tool_choice: Any = None
    tools: list[Any] | None = None
    truncation: str | None = None
    include: list[str] | None = None
    top_logprobs: int | None = None
    reasoning: dict[str, Any] | None = None
    service_tier: str | None = None
    stream_options: dict[str, Any] | None = None
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    route: Route | None = None  # Neural Router's extension, as on chat completions


class InputTokensRequest(msgspec.Struct, kw_only=True):
    model: str | None = None
    input: str | list[dict[str, Any]] | None = None
    instructions: str | None = None
    previous_response_id: str | None = None
    text: dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    tool_choice: Any = None
    tools: list[Any] | None = None
    truncation: str | None = None
    reasoning: dict[str, Any] | None = None


# Fields OpenAI defines that change what is generated or returned and that we cannot honour:
# any value other than "absent" is refused. (Fields with a value we can honour, such as
# `tools: []` or `truncation: "disabled"`, are checked by the handler.)
REFUSED_FIELDS = frozenset({
    "conversation", "prompt", "max_tool_calls", "background_options", "context_management", "image",
    "access_programs", "moderation", "prompt_cache_options", "prompt_cache_retention", "personality",
})

CREATE_FIELDS = frozenset(ResponseCreateRequest.__struct_fields__)
INPUT_TOKENS_FIELDS = frozenset(InputTokensRequest.__struct_fields__)
