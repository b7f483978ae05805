"""Responses API requests (`POST /v1/responses`, `POST /v1/responses/input_tokens`).

The body is decoded to a dict first, so that every field OpenAI defines and we cannot honour is
a 400 naming it (`refused_fields`) and a field nobody defines is a 400 too; then converted to
these Structs for the types."""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from ferroserve.schemas.chat import Route, Routing


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


# Responses (see schemas/chat.py on how these are kept true).
class InputText(msgspec.Struct, tag_field="type", tag="input_text", forbid_unknown_fields=True):
    text: str


class OutputText(msgspec.Struct, tag_field="type", tag="output_text", forbid_unknown_fields=True):
    text: str
    annotations: list[Any]


class MessageItem(msgspec.Struct, tag_field="type", tag="message", forbid_unknown_fields=True):
    id: str
    role: Literal["user", "system", "developer", "assistant"]
    status: str
    content: list[InputText | OutputText]


class FunctionCallItem(msgspec.Struct, tag_field="type", tag="function_call", forbid_unknown_fields=True):
    id: str
    status: str
    arguments: str
    call_id: str
    name: str


class FunctionCallOutputItem(msgspec.Struct, tag_field="type", tag="function_call_output", forbid_unknown_fields=True):
    id: str
    status: str
    call_id: str
    output: str


Item = MessageItem | FunctionCallItem | FunctionCallOutputItem


class ResponseError(msgspec.Struct, forbid_unknown_fields=True):
    code: str
    message: str


class IncompleteDetails(msgspec.Struct, forbid_unknown_fields=True):
    reason: str


class InputTokensDetails(msgspec.Struct, forbid_unknown_fields=True):
    cached_tokens: int


class OutputTokensDetails(msgspec.Struct, forbid_unknown_fields=True):
    reasoning_tokens: int


class ResponseUsage(msgspec.Struct, forbid_unknown_fields=True):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails
    total_tokens: int


class Response(msgspec.Struct, forbid_unknown_fields=True):
    """A response object (`POST /v1/responses`, `GET /v1/responses/{id}`, cancel)."""

    id: str
    object: Literal["response"]
    created_at: int
    status: Literal["queued", "in_progress", "completed", "incomplete", "failed", "cancelled"]
    completed_at: int | None
    error: ResponseError | None
    incomplete_details: IncompleteDetails | None
    model: str
    output: list[Item]
    output_text: str
    previous_response_id: str | None
    usage: ResponseUsage | None
    # The request's fields, echoed.
    instructions: str | None
    max_output_tokens: int | None
    temperature: float
    top_p: float
    text: dict[str, Any]
    store: bool
    background: bool
    metadata: dict[str, str]
    parallel_tool_calls: bool
    tool_choice: Any
    tools: list[Any]
    truncation: str
    user: str | None
    service_tier: str
    reasoning: dict[str, Any]
    top_logprobs: int
    routing: Routing | None = None


class InputTokens(msgspec.Struct, forbid_unknown_fields=True):
    object: Literal["response.input_tokens"]
    input_tokens: int
    input_tokens_details: InputTokensDetails


class InputItemList(msgspec.Struct, forbid_unknown_fields=True):
    object: Literal["list"]
    data: list[Item]
    first_id: str | None
    last_id: str | None
    has_more: bool


class ResponseDeleted(msgspec.Struct, forbid_unknown_fields=True):
    id: str
    object: Literal["response"]
    deleted: bool
