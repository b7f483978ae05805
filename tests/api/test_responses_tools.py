"""Function tools on `/v1/responses` through the official openai client: calls as
`function_call` output items that validate against the function's schema, streamed argument
deltas that reassemble to the stored result, `function_call_output` continuing a conversation
(stored and stateless), background runs, and input token counts that include the tools."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import jsonschema
import openai
import pytest

from tests.conftest import Server
from tests.gateway.conftest import create_key

MODEL = "smollm2"
WEATHER = {
    "type": "function", "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object",
                   "properties": {"city": {"type": "string", "maxLength": 30}, "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False},
}
TIME = {
    "type": "function", "name": "get_time", "description": "Local time in a time zone",
    "parameters": {"type": "object", "properties": {"zone": {"type": "string", "pattern": "^[A-Z][a-z]+/[A-Z][a-z]+$"}},
                   "required": ["zone"], "additionalProperties": False},
}
SCHEMAS = {t["name"]: t["parameters"] for t in (WEATHER, TIME)}
ASK = "What is the weather in Paris, in celsius?"
GREEDY = {"temperature": 0, "max_output_tokens": 200}


@pytest.fixture(scope="module")
def client():
    data_dir = Path(tempfile.mkdtemp(prefix="ferroserve-responses-tools-"))
    key = create_key(data_dir, "alpha")
    server = Server(["--log-level", "warning"], data_dir=data_dir)
    try:
        server.wait_ready()
        yield openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)
    finally:
        server.stop()


def _calls(response) -> list:
    return [item for item in response.output if item.type == "function_call"]


def _assert_valid(call) -> dict:
    assert call.id.startswith("fc_") and call.call_id and call.status == "completed"
    args = json.loads(call.arguments)
    jsonschema.validate(args, SCHEMAS[call.name])
    return args


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "name": "get_time"}])
def test_calls_validate_against_the_function_schema(client, tool_choice):
    r = client.responses.create(model=MODEL, input=ASK, tools=[WEATHER, TIME], tool_choice=tool_choice, **GREEDY)
    assert r.status == "completed" and r.tools[0].name == "get_weather"
    calls = _calls(r)
    assert calls and all(_assert_valid(c) is not None for c in calls)
    if isinstance(tool_choice, dict):
        assert {c.name for c in calls} == {"get_time"}
    assert r.output_text == ""  # no text beside the calls
    again = client.responses.retrieve(r.id)
    assert [(c.name, c.arguments, c.call_id) for c in _calls(again)] == [(c.name, c.arguments, c.call_id) for c in calls]


def test_auto_answers_in_text_or_valid_calls(client):
    r = client.responses.create(model=MODEL, input=ASK, tools=[WEATHER], tool_choice="auto", **GREEDY)
    assert r.status in ("completed", "incomplete")
    for call in _calls(r):
        _assert_valid(call)
    assert _calls(r) or r.output_text


def test_streamed_argument_deltas_reassemble_to_the_result(client):
    kwargs = {"model": MODEL, "input": ASK, "tools": [WEATHER, TIME], "tool_choice": "required", **GREEDY}
    deltas: dict[str, str] = {}
    kinds = []
    with client.responses.stream(**kwargs) as stream:
        for event in stream:
            kinds.append(event.type)
            if event.type == "response.function_call_arguments.delta":
                deltas[event.item_id] = deltas.get(event.item_id, "") + event.delta
            elif event.type == "response.function_call_arguments.done":
                assert deltas[event.item_id] == event.arguments
        final = stream.get_final_response()
    calls = _calls(final)
    assert calls and {c.id: c.arguments for c in calls} == deltas
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
    assert kinds.index("response.output_item.added") < kinds.index("response.function_call_arguments.delta")
    # Greedy: the same calls as the buffered request.
    plain = client.responses.create(**kwargs)
    assert [(c.name, c.arguments) for c in _calls(plain)] == [(c.name, c.arguments) for c in calls]


def test_function_call_output_continues_a_stored_conversation(client):
    first = client.responses.create(model=MODEL, input=ASK, tools=[WEATHER], tool_choice="required", **GREEDY)
    calls = _calls(first)
    results = [{"type": "function_call_output", "call_id": c.call_id, "output": json.dumps({"celsius": 21})} for c in calls]
    second = client.responses.create(model=MODEL, previous_response_id=first.id, input=results, tools=[WEATHER],
                                     tool_choice="none", **GREEDY)
    assert second.status in ("completed", "incomplete") and second.output_text and not _calls(second)
    items = client.responses.input_items.list(second.id, order="asc").data
    kinds = [i.type for i in items]
    assert kinds == ["message", *["function_call"] * len(calls), *["function_call_output"] * len(calls)]
    # The same conversation sent whole (stateless) reads the same prompt and gets the same answer.
    stateless = [{"role": "user", "content": ASK},
                 *({"type": "function_call", "call_id": c.call_id, "name": c.name, "arguments": c.arguments} for c in calls),
                 *results]
    count = client.responses.input_tokens.count
    # (tool_choice "none" renders no tools, in the count as in the generation)
    assert count(model=MODEL, input=stateless, tools=[WEATHER], tool_choice="none").input_tokens == second.usage.input_tokens
    again = client.responses.create(model=MODEL, input=stateless, tools=[WEATHER], tool_choice="none", **GREEDY)
    assert again.output_text == second.output_text


def test_tools_count_as_input_tokens(client):
    count = client.responses.input_tokens.count
    assert count(model=MODEL, input=ASK, tools=[WEATHER]).input_tokens > count(model=MODEL, input=ASK).input_tokens


def test_background_response_with_tools(client):
    r = client.responses.create(model=MODEL, input=ASK, tools=[WEATHER], tool_choice="required", background=True, **GREEDY)
    deadline = time.monotonic() + 60
    while (got := client.responses.retrieve(r.id)).status in ("queued", "in_progress"):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert got.status == "completed"
    [call] = _calls(got)[:1]
    _assert_valid(call)
