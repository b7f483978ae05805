"""Tool calls (`tools`, `tool_choice`, `parallel_tool_calls`) on the bundled SmolLM2 through the
official openai client.

SmolLM2's template knows nothing of tools, so the built-in Hermes lowering renders them; under
`required` or a named function the engine's grammar makes every call name an allowed function
with arguments valid under its schema, whatever a 135M model would have written."""

from __future__ import annotations

import asyncio
import json

import httpx
import jsonschema
import pytest

MODEL = "smollm2"
MAX_TOKENS = 400


def tool(name: str, description: str, parameters: dict) -> dict:
    return {"type": "function", "function": {"name": name, "description": description, "parameters": parameters}}


# Five hand-written tool sets: enums, bounded numbers, string patterns and lengths, arrays,
# nested objects, a $defs reference, optional properties. Strings and arrays are bounded so a
# small model's call ends well before max_tokens.
TOOL_SETS = {
    "weather": ("What is the weather in Paris, in celsius?", [
        tool("get_weather", "Current weather of a city", {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 30}, "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"], "additionalProperties": False}),
    ]),
    "math": ("What is 12 times 7?", [
        tool("add", "Add two numbers", {
            "type": "object", "properties": {"a": {"type": "number", "minimum": -1000, "maximum": 1000},
                                             "b": {"type": "number", "minimum": -1000, "maximum": 1000}},
            "required": ["a", "b"], "additionalProperties": False}),
        tool("multiply", "Multiply two integers", {
            "type": "object", "properties": {"x": {"type": "integer", "minimum": -999, "maximum": 999},
                                             "y": {"type": "integer", "minimum": -999, "maximum": 999}},
            "required": ["x", "y"], "additionalProperties": False}),
    ]),
    "search": ("Find me recipes for pancakes.", [
        tool("web_search", "Search the web", {
            "type": "object", "properties": {"query": {"type": "string", "minLength": 1, "maxLength": 40},
                                             "limit": {"type": "integer", "minimum": 1, "maximum": 10}},
            "required": ["query"], "additionalProperties": False}),
        tool("open_page", "Open a web page", {
            "type": "object", "properties": {"url": {"type": "string", "pattern": "^https://[a-z]{1,20}\\.com/[a-z]{0,20}$"}},
            "required": ["url"], "additionalProperties": False}),
    ]),
    "calendar": ("Schedule lunch with Ana and Bo on 2025-03-14.", [
        tool("create_event", "Create a calendar event", {
            "type": "object",
            "properties": {
                "title": {"type": "string", "pattern": "^[A-Z][a-z ]{1,20}$"},
                "date": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"},
                "attendees": {"type": "array", "maxItems": 3, "items": {"type": "string", "maxLength": 12}},
            },
            "required": ["title", "date", "attendees"], "additionalProperties": False}),
    ]),
    "lights": ("Dim the kitchen lights to 30 percent, warm white.", [
        tool("set_light", "Set a room's lights", {
            "type": "object",
            "$defs": {"settings": {"type": "object",
                                   "properties": {"brightness": {"type": "integer", "minimum": 0, "maximum": 100},
                                                  "color": {"enum": ["warm", "cold", "red"]}},
                                   "required": ["brightness", "color"], "additionalProperties": False}},
            "properties": {"room": {"enum": ["kitchen", "bedroom", "hall"]}, "settings": {"$ref": "#/$defs/settings"}},
            "required": ["room", "settings"], "additionalProperties": False}),
        tool("lock_door", "Lock a door", {
            "type": "object", "properties": {"door": {"enum": ["front", "back"]}}, "required": ["door"],
            "additionalProperties": False}),
    ]),
}
SAMPLING = [{"temperature": 0}, {"temperature": 1, "seed": 1}, {"temperature": 1, "seed": 2}]


def _ask(client, name: str, tool_choice, parallel: bool | None = None, **kw):
    prompt, tools = TOOL_SETS[name]
    extra = {} if parallel is None else {"parallel_tool_calls": parallel}
    kw.setdefault("max_tokens", MAX_TOKENS)
    return client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": prompt}], tools=tools, tool_choice=tool_choice, **extra, **kw)


def _check_calls(message, tools: list[dict], allowed: set[str], cut: bool = False) -> None:
    """Every call names an allowed function and its arguments validate; `cut` (max_tokens
    reached) leaves the last call a prefix."""
    assert message.content is None, message
    assert message.tool_calls, message
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    for call in message.tool_calls[:-1] if cut else message.tool_calls:
        assert call.type == "function" and call.id.startswith("call_"), call
        assert call.function.name in allowed, call
        jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])


@pytest.mark.parametrize("name", sorted(TOOL_SETS))
@pytest.mark.parametrize("parallel", [True, False])
def test_required_calls_validate(client, name, parallel):
    tools = TOOL_SETS[name][1]
    for sampling in SAMPLING:
        r = _ask(client, name, "required", parallel, **sampling)
        choice = r.choices[0]
        if parallel and choice.finish_reason == "length":
            # A 135M model may repeat calls until max_tokens: the model's doing, not the mask's
            # (the complete calls still validate, and the client is told it was cut).
            assert len(choice.message.tool_calls) > 1, choice
            _check_calls(choice.message, tools, {t["function"]["name"] for t in tools}, cut=True)
            continue
        assert choice.finish_reason == "tool_calls", (sampling, choice)
        _check_calls(choice.message, tools, {t["function"]["name"] for t in tools})
        if not parallel:
            assert len(choice.message.tool_calls) == 1, choice.message


@pytest.mark.parametrize("name", sorted(TOOL_SETS))
def test_named_function_calls_validate(client, name):
    tools = TOOL_SETS[name][1]
    named = tools[-1]["function"]["name"]  # not always the obvious one
    for sampling in SAMPLING:
        r = _ask(client, name, {"type": "function", "function": {"name": named}}, False, **sampling)
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls", (sampling, choice)
        _check_calls(choice.message, tools, {named})
        assert len(choice.message.tool_calls) == 1


@pytest.mark.parametrize("name", sorted(TOOL_SETS))
def test_auto_is_text_or_valid_calls(client, name):
    tools = TOOL_SETS[name][1]
    r = _ask(client, name, "auto", temperature=0)
    choice = r.choices[0]
    if choice.message.tool_calls:
        assert choice.finish_reason == "tool_calls"
        _check_calls(choice.message, tools, {t["function"]["name"] for t in tools})
    else:
        assert "<tool_call>" not in (choice.message.content or ""), choice.message


@pytest.mark.parametrize("name,tool_choice", [("weather", "required"), ("math", "required"), ("lights", "required"),
                                              ("search", {"type": "function", "function": {"name": "web_search"}})])
def test_stream_reassembles_to_the_non_streamed_calls(client, name, tool_choice):
    whole = _ask(client, name, tool_choice, temperature=0).choices[0]
    stream = _ask(client, name, tool_choice, temperature=0, stream=True)
    calls: dict[int, dict] = {}
    finish = None
    for chunk in stream:
        for c in chunk.choices:
            for d in c.delta.tool_calls or ():
                if d.index not in calls:
                    # The first delta of a call: its id, type and name, before any arguments.
                    assert d.id and d.type == "function" and d.function.name, d
                    calls[d.index] = {"id": d.id, "name": d.function.name, "arguments": d.function.arguments or ""}
                else:
                    assert d.id is None and (d.function.name is None), d
                    calls[d.index]["arguments"] += d.function.arguments or ""
            assert not c.delta.content, c.delta
            finish = c.finish_reason or finish
    # (a repeated parallel call may run into max_tokens: then both say so)
    assert finish == whole.finish_reason and finish in ("tool_calls", "length"), (finish, whole)
    got = [(calls[i]["name"], calls[i]["arguments"]) for i in sorted(calls)]
    want = [(c.function.name, c.function.arguments) for c in whole.message.tool_calls]
    assert got == want
    assert len({c["id"] for c in calls.values()}) == len(calls)


def test_multi_turn_call_result_answer(client, server):
    prompt, tools = TOOL_SETS["weather"]
    messages: list[dict] = [{"role": "user", "content": prompt}]
    first = client.chat.completions.create(model=MODEL, messages=messages, tools=tools, tool_choice="required",
                                           parallel_tool_calls=False, temperature=0, max_tokens=MAX_TOKENS)
    call = first.choices[0].message.tool_calls[0]
    messages.append({"role": "assistant", "content": None, "tool_calls": [
        {"id": call.id, "type": "function", "function": {"name": call.function.name, "arguments": call.function.arguments}}]})
    messages.append({"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 18, "sky": "cloudy"}'})
    # The conversation renders in the Hermes form: the call in the assistant turn, the result
    # in a user turn.
    tokens = httpx.post(server.url + "/v1/tokenize", json={"model": MODEL, "messages": messages}).json()["tokens"]
    text = httpx.post(server.url + "/v1/detokenize", json={"model": MODEL, "tokens": tokens}).json()["prompt"]
    assert f'<tool_call>\n{{"name": "get_weather", "arguments": {call.function.arguments}}}\n</tool_call>' in text, text
    assert '<|im_start|>user\n<tool_response>\n{"temperature": 18, "sky": "cloudy"}\n</tool_response>' in text, text
    final = client.chat.completions.create(model=MODEL, messages=messages, tools=tools, tool_choice="none",
                                           temperature=0, max_tokens=60)
    answer = final.choices[0]
    assert answer.finish_reason in ("stop", "length") and answer.message.content, answer
    assert not answer.message.tool_calls
    # Under auto the model may answer or call again; either way the turn completes.
    again = client.chat.completions.create(model=MODEL, messages=messages, tools=tools, tool_choice="auto",
                                           temperature=0, max_tokens=60)
    assert again.choices[0].finish_reason in ("stop", "length", "tool_calls")


def _post(server, body: dict) -> tuple[int, dict]:
    r = httpx.post(server.url + "/v1/chat/completions",
                   json={"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], **body})
    return r.status_code, r.json()


@pytest.mark.parametrize("body,param,needle", [
    ({"tools": TOOL_SETS["weather"][1], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice", "nope"),
    ({"tools": TOOL_SETS["weather"][1], "tool_choice": "always"}, "tool_choice", "always"),
    ({"tool_choice": "required"}, "tool_choice", "needs tools"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools", "name"),
    ({"tools": [tool("f", "", {"type": "array", "uniqueItems": True})], "tool_choice": "required"}, "tools", "uniqueItems"),
])
def test_bad_tool_requests_are_400s(server, body, param, needle):
    status, out = _post(server, body)
    assert status == 400, out
    assert out["error"]["param"] == param and needle in out["error"]["message"], out


def test_tool_choice_none_is_plain_text(client):
    r = _ask(client, "weather", "none", temperature=0, max_tokens=30)
    assert r.choices[0].message.tool_calls is None and r.choices[0].message.content


# Remote backends: an OpenAI-compatible upstream gets the tools as sent and its tool calls come
# back as the same events (here the upstream is this server itself); Triton refuses tools.
@pytest.mark.parametrize("stream", [False, True])
def test_upstream_forwards_tools_and_parses_calls(client, server, stream):
    from ferroserve.backends.base import ChatRequest, Finished, Message, SamplingParams, Tool, ToolCallDelta
    from tests.backends.test_upstream import backend, run_events

    prompt, tools = TOOL_SETS["math"]
    specs = [Tool(name=t["function"]["name"], parameters=t["function"]["parameters"]) for t in tools]
    request = ChatRequest(messages=[Message("user", prompt)], stream=stream, tools=specs, tool_choice="function",
                          tool_choice_function="multiply", parallel_tool_calls=False,
                          params=SamplingParams(max_tokens=MAX_TOKENS, temperature=0))
    events = run_events(backend(server.url + "/v1"), request)
    calls: dict[int, list[str]] = {}
    for e in events:
        if isinstance(e, ToolCallDelta):
            if e.name is not None:
                calls[e.call_index] = [e.name, ""]
            calls[e.call_index][1] += e.arguments
    [finished] = [e for e in events if isinstance(e, Finished)]
    assert finished.reason == "tool_calls", events
    [(name, arguments)] = calls.values()
    assert name == "multiply"
    jsonschema.validate(json.loads(arguments), tools[1]["function"]["parameters"])
    direct = _ask(client, "math", {"type": "function", "function": {"name": "multiply"}}, False, temperature=0)
    assert direct.choices[0].message.tool_calls[0].function.arguments == arguments


def test_triton_refuses_tools():
    from ferroserve.backends.base import ChatRequest, Failed, Message, SamplingParams, Tool
    from ferroserve.backends.triton import create
    from ferroserve.config import BackendSpec, ModelSpec
    from tests.conftest import free_port

    dead = BackendSpec(name="dead", kind="triton", base_url=f"127.0.0.1:{free_port()}", read_timeout_s=5)
    chat = create(ModelSpec(name="g", path="", kind="chat", upstream_model="gen"), dead, {})

    async def collect():
        return [e async for e in chat.generate(ChatRequest(
            messages=[Message("user", "x")], params=SamplingParams(), tools=[Tool(name="f", parameters={})]))]

    [event] = asyncio.run(collect())
    assert isinstance(event, Failed) and event.error.status == 400 and event.error.param == "tools"
