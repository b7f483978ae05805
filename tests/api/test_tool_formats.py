"""Tool calls in the format the model's own template asks for, not only Hermes': the bundled
SmolLM2 served with a Mistral-style and a Llama-3-style tool template (tests/api/templates).
The engine reads the format off the template, constrains calls in it and parses them back, so
calls validate, streams reassemble, a text answer under `auto` never carries a call, and a
call → result → answer conversation renders through the template."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import openai
import pytest

from tests.conftest import Server

TEMPLATES = Path(__file__).parent / "templates"
MODEL = "smollm2"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object",
                   "properties": {"city": {"type": "string", "maxLength": 30}, "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Local time in a time zone",
    "parameters": {"type": "object", "properties": {"zone": {"type": "string", "pattern": "^[A-Z][a-z]+/[A-Z][a-z]+$"}},
                   "required": ["zone"], "additionalProperties": False}}}
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}
ASK = [{"role": "user", "content": "What is the weather in Paris, in celsius?"}]
# The text that marks a call in each format: a text answer must not contain it.
TRIGGER = {"mistral_tools": "[TOOL_CALLS]", "llama3_tools": '{"name"'}


@pytest.fixture(scope="module", params=sorted(TRIGGER))
def served(request):
    server = Server(["--insecure-no-auth", "--log-level", "warning", "--chat-template",
                     str(TEMPLATES / f"{request.param}.jinja")])
    try:
        server.wait_ready()
        yield request.param, openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
    finally:
        server.stop()


def _valid(calls) -> list[tuple[str, dict]]:
    out = []
    for call in calls:
        args = json.loads(call.function.arguments)
        jsonschema.validate(args, SCHEMAS[call.function.name])
        out.append((call.function.name, args))
    return out


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_time"}}])
def test_calls_in_the_templates_format_validate(served, tool_choice):
    _, client = served
    r = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER, TIME], tool_choice=tool_choice,
                                       temperature=0, max_tokens=200)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    calls = _valid(choice.message.tool_calls)
    assert calls
    if isinstance(tool_choice, dict):
        assert {name for name, _ in calls} == {"get_time"}


def test_streamed_calls_reassemble(served):
    _, client = served
    kwargs = {"model": MODEL, "messages": ASK, "tools": [WEATHER, TIME], "tool_choice": "required", "temperature": 0,
              "max_tokens": 200}
    parts: dict[int, list[str]] = {}
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        for delta in chunk.choices[0].delta.tool_calls or ():
            if delta.function.name:
                parts[delta.index] = [delta.function.name, ""]
            parts[delta.index][1] += delta.function.arguments or ""
    plain = client.chat.completions.create(**kwargs).choices[0].message.tool_calls
    assert [tuple(parts[i]) for i in sorted(parts)] == [(c.function.name, c.function.arguments) for c in plain]


def test_auto_text_never_carries_a_call(served):
    name, client = served
    for seed in range(3):
        r = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER], tool_choice="auto", temperature=1,
                                           seed=seed, max_tokens=60)
        message = r.choices[0].message
        if message.tool_calls:
            _valid(message.tool_calls)
        else:
            assert TRIGGER[name] not in (message.content or "")


def test_call_result_answer_renders_through_the_template(served):
    _, client = served
    first = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER], tool_choice="required",
                                           temperature=0, max_tokens=200).choices[0].message

    def answer(result: dict):
        history = [*ASK, first.model_dump(exclude_none=True),
                   *({"role": "tool", "tool_call_id": c.id, "content": json.dumps(result)} for c in first.tool_calls)]
        return client.chat.completions.create(model=MODEL, messages=history, tools=[WEATHER], temperature=0, max_tokens=30)

    short, long = answer({"celsius": 21}), answer({"celsius": 21, "sky": "clear, with a light wind from the west"})
    assert short.choices[0].finish_reason in ("stop", "length", "tool_calls")
    # The tool's result is in the prompt the template rendered.
    assert long.usage.prompt_tokens > short.usage.prompt_tokens
