"""Chat and text completion requests (OpenAI shapes plus top_k / min_p / ignore_eos)."""

from __future__ import annotations

from typing import Any, Literal

import msgspec


class ContentPart(msgspec.Struct, forbid_unknown_fields=False):
    type: str
    text: str | None = None


class ChatMessage(msgspec.Struct, forbid_unknown_fields=False):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[Any] | None = None
    tool_call_id: str | None = None


class Route(msgspec.Struct, forbid_unknown_fields=False):
    """Neural Router's routing extension (`route` on a request)."""

    objective: str | None = None
    fallbacks: list[str] = []
    max_latency_ms: float | None = None
    task_class: str | None = None


class StreamOptions(msgspec.Struct, forbid_unknown_fields=False):
    include_usage: bool = False


class SamplingFields(msgspec.Struct, forbid_unknown_fields=False, kw_only=True):
    """Fields shared by chat and text completions."""

    model: str
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    n: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    max_tokens: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    seed: int | None = None
    user: str | None = None
    ignore_eos: bool = False
    route: Route | None = None


class ChatCompletionRequest(SamplingFields, kw_only=True):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    response_format: Any = None
    parallel_tool_calls: bool | None = None
    # OpenAI fields checked by `api/chat.unhonoured`: honoured in their neutral (or our) form,
    # a 400 naming them otherwise.
    service_tier: str | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None
    modalities: list[str] | None = None
    audio: Any = None
    prediction: Any = None
    functions: Any = None
    function_call: Any = None
    reasoning_effort: str | None = None
    verbosity: str | None = None
    web_search_options: Any = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = None
    safety_identifier: str | None = None


class CompletionRequest(SamplingFields, kw_only=True):
    # str, list[str], list[int] or list[list[int]]; elements checked by the handler.
    prompt: str | list[Any]
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None
    response_format: Any = None


class TokenizeRequest(msgspec.Struct, forbid_unknown_fields=False):
    model: str
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(msgspec.Struct, forbid_unknown_fields=False):
    model: str
    tokens: list[int]


chat_decoder = msgspec.json.Decoder(ChatCompletionRequest)
completion_decoder = msgspec.json.Decoder(CompletionRequest)
tokenize_decoder = msgspec.json.Decoder(TokenizeRequest)
detokenize_decoder = msgspec.json.Decoder(DetokenizeRequest)


# Responses. The handlers assemble these as dicts or pre-encoded bytes (the hot paths); the
# Structs describe them for `/v1/openapi.json`, and the schemathesis tests check live
# responses against that document, so the two cannot drift apart. `forbid_unknown_fields`
# makes the document say `additionalProperties: false`: an undocumented field is a failure.
class PromptTokensDetails(msgspec.Struct, forbid_unknown_fields=True):
    cached_tokens: int


class Usage(msgspec.Struct, forbid_unknown_fields=True):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class Routing(msgspec.Struct, forbid_unknown_fields=True):
    """Neural Router's answer on a routed request (`model: "auto"`, `route`, fallbacks)."""

    selected: str | None
    objective: str | None
    candidates_considered: int
    reason: str | None
    fallbacks_used: list[str]


class FunctionCall(msgspec.Struct, forbid_unknown_fields=True):
    name: str
    arguments: str


class ToolCallOut(msgspec.Struct, forbid_unknown_fields=True):
    id: str
    type: Literal["function"]
    function: FunctionCall


class AssistantMessage(msgspec.Struct, forbid_unknown_fields=True):
    role: Literal["assistant"]
    content: str | None
    tool_calls: list[ToolCallOut] = []


class TopLogprob(msgspec.Struct, forbid_unknown_fields=True):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(msgspec.Struct, forbid_unknown_fields=True):
    token: str
    logprob: float
    bytes: list[int]
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(msgspec.Struct, forbid_unknown_fields=True):
    content: list[TokenLogprob]


class ChatChoice(msgspec.Struct, forbid_unknown_fields=True):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None
    finish_reason: str | None


class ChatCompletion(msgspec.Struct, forbid_unknown_fields=True):
    """`POST /v1/chat/completions` without `stream` (with it: `chat.completion.chunk` events)."""

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChatChoice]
    usage: Usage
    routing: Routing | None = None


class CompletionLogprobs(msgspec.Struct, forbid_unknown_fields=True):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(msgspec.Struct, forbid_unknown_fields=True):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: str | None


class TextCompletion(msgspec.Struct, forbid_unknown_fields=True):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    system_fingerprint: str
    choices: list[CompletionChoice]
    usage: Usage
    routing: Routing | None = None


class TokenizeResponse(msgspec.Struct, forbid_unknown_fields=True):
    tokens: list[int]
    count: int
    max_model_len: int | None


class DetokenizeResponse(msgspec.Struct, forbid_unknown_fields=True):
    prompt: str
