"""`/v1/responses` through the official openai client against a real server whose gateway has
keys in two workspaces (made by the real `keys` CLI): create, stream, retrieve, chaining with
`previous_response_id`, background + poll + cancel, delete, input items, input token counts,
`text.format` json_schema, refused fields, and workspace isolation."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import httpx
import jsonschema
import openai
import pytest

from tests.conftest import Server
from tests.gateway.conftest import auth, create_key, usage_rows

MODEL = "smollm2"
SMALL = {"temperature": 0, "max_output_tokens": 24}


@pytest.fixture(scope="module")
def srv():
    data_dir = Path(tempfile.mkdtemp(prefix="ferroserve-responses-"))
    keys = {"alpha": create_key(data_dir, "alpha"), "beta": create_key(data_dir, "beta")}
    server = Server(["--log-level", "warning"], data_dir=data_dir)
    try:
        server.wait_ready()
        server.keys = keys
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def client(srv) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key=srv.keys["alpha"], max_retries=0)


@pytest.fixture(scope="module")
def other(srv) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key=srv.keys["beta"], max_retries=0)


def _message_text(item) -> str:
    assert item.type == "message"
    return "".join(p.text for p in item.content)


def test_create_with_string_input_and_instructions(client):
    r = client.responses.create(model=MODEL, input="What is the capital of France?", instructions="Answer in one sentence.",
                                **SMALL)
    assert r.id.startswith("resp_") and r.object == "response"
    assert r.status in ("completed", "incomplete")
    assert r.model == "SmolLM2-135M-Instruct" and r.instructions == "Answer in one sentence."
    assert r.temperature == 0 and r.max_output_tokens == 24 and r.store is True and r.background is False
    [item] = r.output
    assert item.role == "assistant" and item.id.startswith("msg_")
    assert item.content[0].type == "output_text" and item.content[0].annotations == []
    assert r.output_text and r.output_text == item.content[0].text
    u = r.usage
    assert u.input_tokens > 0 and 0 < u.output_tokens <= 24 and u.total_tokens == u.input_tokens + u.output_tokens
    assert u.input_tokens_details.cached_tokens >= 0 and u.output_tokens_details.reasoning_tokens == 0
    if r.status == "incomplete":
        assert r.incomplete_details.reason == "max_output_tokens" and item.status == "incomplete"
    else:
        assert r.incomplete_details is None and item.status == "completed"
    # The instructions are the prompt's system message: counting the same prompt agrees, and
    # other instructions make another prompt.
    count = client.responses.input_tokens.count
    assert count(model=MODEL, input="What is the capital of France?", instructions="Answer in one sentence.").input_tokens \
        == u.input_tokens
    assert count(model=MODEL, input="What is the capital of France?", instructions="Answer in one short sentence, please.") \
        .input_tokens > u.input_tokens


def test_item_input_equals_string_input(client):
    as_text = client.responses.create(model=MODEL, input="Name a color.", **SMALL)
    as_items = client.responses.create(model=MODEL, **SMALL, input=[
        {"role": "user", "content": [{"type": "input_text", "text": "Name a color."}]}])
    assert as_items.output_text == as_text.output_text
    assert as_items.usage.input_tokens == as_text.usage.input_tokens
    multi = client.responses.create(model=MODEL, **SMALL, input=[
        {"type": "message", "role": "developer", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": [{"type": "output_text", "text": "Hello! How can I help?"}]},
        {"role": "user", "content": "Name a color."},
    ])
    assert multi.output_text and multi.usage.input_tokens > as_text.usage.input_tokens


def test_max_output_tokens_cut_is_incomplete(client):
    r = client.responses.create(model=MODEL, input="Write a long story about a dragon.", temperature=0, max_output_tokens=16)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.output_tokens == 16 and r.output[0].status == "incomplete"


def test_stream_events_in_order(client):
    kwargs = {"model": MODEL, "input": "Say hello to Ada.", "temperature": 0, "max_output_tokens": 40}
    with client.responses.stream(**kwargs) as stream:
        events = list(stream)
    types = [e.type for e in events]
    final = types[-1]
    assert final in ("response.completed", "response.incomplete")
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    assert deltas
    assert types == ["response.created", "response.in_progress", "response.output_item.added",
                     "response.content_part.added", *["response.output_text.delta"] * len(deltas),
                     "response.output_text.done", "response.content_part.done", "response.output_item.done", final]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    ids = {e.response.id for e in events if hasattr(e, "response")}
    assert len(ids) == 1
    assert events[0].response.status == "in_progress" and events[0].response.output == []
    text = "".join(d.delta for d in deltas)
    done = next(e for e in events if e.type == "response.output_text.done")
    assert done.text == text
    assert {d.item_id for d in deltas} == {done.item_id} == {events[2].item.id}
    assert _message_text(events[-2].item) == text
    last = events[-1].response
    assert last.output_text == text and last.usage.output_tokens == len(deltas) or last.usage.output_tokens >= len(deltas)
    # The same request without streaming answers the same text, and the streamed one was stored.
    plain = client.responses.create(**kwargs)
    assert plain.output_text == text
    assert client.responses.retrieve(last.id).output_text == text


def test_stream_raw_sse_names_each_event(srv):
    with httpx.stream("POST", srv.url + "/v1/responses", headers=auth(srv.keys["alpha"]), timeout=60,
                      json={"model": MODEL, "input": "Hi", "stream": True, "temperature": 0, "max_output_tokens": 4}) as r:
        assert r.headers["content-type"] == "text/event-stream"
        body = r.read().decode()
    frames = [f for f in body.split("\n\n") if f]
    for frame in frames:
        event_line, data_line = frame.split("\n")
        assert event_line.removeprefix("event: ") == json.loads(data_line.removeprefix("data: "))["type"]
    assert "[DONE]" not in body


def test_retrieve(client):
    r = client.responses.create(model=MODEL, input="Count to three.", **SMALL)
    got = client.responses.retrieve(r.id)
    assert got.model_dump() == r.model_dump()


def test_previous_response_id_continues_the_conversation(client):
    first = client.responses.create(model=MODEL, input="My name is Ada. Say hello.", instructions="Be brief.", **SMALL)
    second = client.responses.create(model=MODEL, input="What is my name?", previous_response_id=first.id, **SMALL)
    assert second.previous_response_id == first.id and second.instructions is None
    # The second prompt holds the first exchange: more tokens than first input + output (the
    # first's instructions are not carried over, OpenAI's rule) plus the new question alone.
    alone = client.responses.create(model=MODEL, input="What is my name?", **SMALL)
    assert second.usage.input_tokens > first.usage.output_tokens + alone.usage.input_tokens
    items = client.responses.input_items.list(second.id)
    assert items.object == "list" and items.has_more is False
    assert [(i.role, _message_text(i)) for i in items.data] == [
        ("user", "My name is Ada. Say hello."), ("assistant", first.output_text), ("user", "What is my name?")]
    assert items.first_id == items.data[0].id and items.last_id == items.data[-1].id
    assert items.data[1].id == first.output[0].id
    # A third turn carries both earlier exchanges.
    third = client.responses.create(model=MODEL, input="Thanks.", previous_response_id=second.id, **SMALL)
    assert len(client.responses.input_items.list(third.id).data) == 5
    # input_tokens counts the same prompt without running it.
    counted = client.responses.input_tokens.count(model=MODEL, input="What is my name?", previous_response_id=first.id)
    assert counted.object == "response.input_tokens" and counted.input_tokens == second.usage.input_tokens


def test_input_items_pages_and_orders(client):
    r = client.responses.create(model=MODEL, **SMALL, input=[
        {"role": "user", "content": "one"}, {"role": "assistant", "content": "two"}, {"role": "user", "content": "three"}])
    page = client.responses.input_items.list(r.id, limit=2)
    assert [_message_text(i) for i in page.data] == ["one", "two"] and page.has_more is True
    rest = client.responses.input_items.list(r.id, after=page.last_id)
    assert [_message_text(i) for i in rest.data] == ["three"] and rest.has_more is False
    desc = client.responses.input_items.list(r.id, order="desc")
    assert [_message_text(i) for i in desc.data] == ["three", "two", "one"]
    assert desc.data[0].type == "message" and desc.data[0].content[0].type == "input_text"


def test_background_poll_then_completed(client):
    r = client.responses.create(model=MODEL, input="Say hi.", background=True, **SMALL)
    assert r.status == "queued" and r.background is True and r.output == []
    seen = {r.status}
    deadline = time.monotonic() + 60
    while (got := client.responses.retrieve(r.id)).status in ("queued", "in_progress"):
        seen.add(got.status)
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert got.status in ("completed", "incomplete") and got.output_text and got.usage.output_tokens > 0
    # Same answer as in the foreground.
    assert got.output_text == client.responses.create(model=MODEL, input="Say hi.", **SMALL).output_text


def test_background_cancel_stops_generation_and_meters_it(srv, client):
    raw = httpx.post(srv.url + "/v1/responses", headers=auth(srv.keys["alpha"]), timeout=60,
                     json={"model": MODEL, "input": "Write a very long story about the sea.", "background": True,
                           "temperature": 0, "max_output_tokens": 2000})
    assert raw.status_code == 200, raw.text
    rid, request_id = raw.json()["id"], raw.headers["x-request-id"]
    deadline = time.monotonic() + 60
    while client.responses.retrieve(rid).status == "queued":
        assert time.monotonic() < deadline
        time.sleep(0.02)
    time.sleep(0.3)
    cancelled = client.responses.cancel(rid)
    assert cancelled.status == "cancelled"
    assert 0 < cancelled.usage.output_tokens < 2000
    assert client.responses.retrieve(rid).status == "cancelled"
    assert client.responses.cancel(rid).status == "cancelled"  # twice is harmless
    # One usage record for the request, written by the background task with what it generated.
    deadline = time.monotonic() + 10
    while not (rows := [row for row in usage_rows(srv.data_dir) if row["request_id"] == request_id]):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    [row] = rows
    assert row["route"] == "/v1/responses" and row["status"] == 499
    assert row["completion_tokens"] == cancelled.usage.output_tokens and row["prompt_tokens"] == cancelled.usage.input_tokens


def test_completed_background_response_is_metered_once(srv, client):
    raw = httpx.post(srv.url + "/v1/responses", headers=auth(srv.keys["alpha"]), timeout=60,
                     json={"model": MODEL, "input": "Hi", "background": True, **SMALL})
    rid, request_id = raw.json()["id"], raw.headers["x-request-id"]
    while (got := client.responses.retrieve(rid)).status in ("queued", "in_progress"):
        time.sleep(0.02)
    deadline = time.monotonic() + 10
    while not (rows := [row for row in usage_rows(srv.data_dir) if row["request_id"] == request_id]):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    time.sleep(0.3)
    [row] = [row for row in usage_rows(srv.data_dir) if row["request_id"] == request_id]
    assert row["status"] == 200 and row["completion_tokens"] == got.usage.output_tokens > 0


def test_cancel_needs_background(client):
    r = client.responses.create(model=MODEL, input="Hi", **SMALL)
    with pytest.raises(openai.BadRequestError):
        client.responses.cancel(r.id)


def test_delete_then_404(client):
    r = client.responses.create(model=MODEL, input="Hi", **SMALL)
    client.responses.delete(r.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.delete(r.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.input_items.list(r.id)
    with pytest.raises(openai.BadRequestError) as exc:
        client.responses.create(model=MODEL, input="Hi", previous_response_id=r.id, **SMALL)
    assert exc.value.body["param"] == "previous_response_id"


def test_store_false_is_not_retrievable(client):
    r = client.responses.create(model=MODEL, input="Hi", store=False, **SMALL)
    assert r.store is False and r.output_text
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r.id)


def test_text_format_json_schema_output_validates(client):
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 20}, "legs": {"type": "integer", "minimum": 0, "maximum": 8},
                       "color": {"enum": ["black", "white", "orange"]}},
        "required": ["name", "legs", "color"],
        "additionalProperties": False,
    }
    fmt = {"type": "json_schema", "name": "animal", "schema": schema, "strict": True}
    for temperature in (0, 1):
        r = client.responses.create(model=MODEL, input="Describe a cat as JSON.", text={"format": fmt},
                                    temperature=temperature, max_output_tokens=120)
        assert r.status == "completed", r.output_text
        jsonschema.validate(json.loads(r.output_text), schema)
        assert r.text.format.type == "json_schema" and r.text.format.name == "animal"
    with client.responses.stream(model=MODEL, input="Describe a cat as JSON.", text={"format": fmt}, temperature=0,
                                 max_output_tokens=120) as stream:
        final = stream.get_final_response()
    jsonschema.validate(json.loads(final.output_text), schema)
    plain = client.responses.create(model=MODEL, input="Hi", text={"format": {"type": "text"}}, **SMALL)
    assert plain.text.format.type == "text"


def test_text_format_errors_name_text_format(client):
    with pytest.raises(openai.BadRequestError) as exc:
        client.responses.create(model=MODEL, input="x", text={"format": {"type": "json_schema", "schema": {}}})
    assert exc.value.body["param"] == "text.format"
    with pytest.raises(openai.BadRequestError) as exc:
        client.responses.create(model=MODEL, input="x", text={"format": {"type": "grammar"}})
    assert exc.value.body["param"] == "text.format"


@pytest.mark.parametrize("extra, param", [
    ({"frobnicate": 1}, "frobnicate"),
    ({"tools": [{"type": "web_search"}]}, "tools"),
    ({"tools": [{"type": "function", "name": "bad name!"}]}, "tools"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [{"type": "function", "name": "f"}], "tool_choice": {"type": "function", "name": "g"}}, "tool_choice"),
    ({"tools": [{"type": "function", "name": "f"}], "tool_choice": {"type": "file_search"}}, "tool_choice"),
    ({"reasoning": {"effort": "high"}}, "reasoning"),
    ({"include": ["message.output_text.logprobs"]}, "include"),
    ({"conversation": "conv_1"}, "conversation"),
    ({"truncation": "auto"}, "truncation"),
    ({"top_logprobs": 3}, "top_logprobs"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x"}]}]}, "input"),
    ({"input": [{"type": "reasoning", "summary": []}]}, "input"),
    ({"input": [{"type": "function_call_output", "output": "x"}]}, "input"),
    ({"input": [{"type": "function_call", "call_id": "c", "name": "f"}]}, "input"),
    ({"max_output_tokens": 0}, "max_output_tokens"),
])
def test_fields_we_cannot_honour_are_400_naming_them(srv, extra, param):
    body = {"model": MODEL, "input": "Hi", **extra}
    r = httpx.post(srv.url + "/v1/responses", json=body, headers=auth(srv.keys["alpha"]), timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
    assert param.split(".")[0] in r.json()["error"]["message"] or param == "input"


def test_neutral_values_of_openai_fields_are_accepted(client):
    r = client.responses.create(model=MODEL, input="Hi", tools=[], tool_choice="auto", truncation="disabled",
                                parallel_tool_calls=True, metadata={"run": "7"}, user="u1", **SMALL)
    assert r.metadata == {"run": "7"} and r.tools == [] and r.truncation == "disabled"


def test_model_auto_answers(client):
    r = client.responses.create(model="auto", input="Hi", **SMALL)
    assert r.model == "SmolLM2-135M-Instruct" and r.output_text


def test_workspaces_are_isolated(client, other):
    r = client.responses.create(model=MODEL, input="A secret for alpha.", **SMALL)
    with pytest.raises(openai.NotFoundError):
        other.responses.retrieve(r.id)
    with pytest.raises(openai.NotFoundError):
        other.responses.input_items.list(r.id)
    with pytest.raises(openai.NotFoundError):
        other.responses.delete(r.id)
    with pytest.raises(openai.NotFoundError):
        other.responses.cancel(r.id)
    with pytest.raises(openai.BadRequestError):
        other.responses.create(model=MODEL, input="What was the secret?", previous_response_id=r.id, **SMALL)
    assert client.responses.retrieve(r.id).output_text == r.output_text  # still there for its owner


def test_routes_need_a_key(srv):
    assert httpx.get(srv.url + "/v1/responses/resp_x").status_code == 401
    assert httpx.post(srv.url + "/v1/responses", json={"model": MODEL, "input": "x"}).status_code == 401
    assert httpx.get(srv.url + "/v1/responses", headers=auth(srv.keys["alpha"])).status_code == 405


def test_background_stream_announces_queued_and_runs_to_the_end(client):
    events = list(client.responses.create(model=MODEL, input="Say hi.", background=True, stream=True, **SMALL))
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[0].type == "response.created" and events[0].response.status == "queued"
    assert events[1].type == "response.in_progress" and events[-1].type in ("response.completed", "response.incomplete")
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    final = events[-1].response
    assert text and final.output_text == text and final.background is True
    assert client.responses.retrieve(final.id).output_text == text


def _sse(lines) -> list[dict]:
    return [json.loads(line[6:]) for line in lines if line.startswith("data: ")]


def test_background_stream_survives_the_client_and_resumes_after_a_sequence_number(srv, client):
    body = {"model": MODEL, "input": "Write a very long story about the sea.", "background": True, "stream": True,
            "temperature": 0, "max_output_tokens": 300}
    seen: list[dict] = []
    with httpx.stream("POST", srv.url + "/v1/responses", json=body, headers=auth(srv.keys["alpha"]), timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            seen += _sse([line])
            if sum(e["type"] == "response.output_text.delta" for e in seen) == 5:
                break  # the client leaves mid-answer
    rid, last = seen[0]["response"]["id"], seen[-1]["sequence_number"]
    rest: list[dict] = []
    with httpx.stream("GET", f"{srv.url}/v1/responses/{rid}", params={"stream": "true", "starting_after": last},
                      headers=auth(srv.keys["alpha"]), timeout=60) as r:
        assert r.status_code == 200, r.read()
        rest = _sse(r.iter_lines())
    assert [e["sequence_number"] for e in rest] == list(range(last + 1, last + 1 + len(rest)))
    assert rest[-1]["type"] in ("response.completed", "response.incomplete")
    text = "".join(e["delta"] for e in seen + rest if e["type"] == "response.output_text.delta")
    assert text == rest[-1]["response"]["output_text"] == client.responses.retrieve(rid).output_text
    # Finished: there is nothing left to stream.
    with pytest.raises(openai.BadRequestError) as exc:
        client.responses.retrieve(rid, stream=True)
    assert exc.value.body["param"] == "stream"
