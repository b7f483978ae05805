"""Structured output (`response_format`) on the bundled SmolLM2 through the official openai client.

The engine masks every token with the schema's grammar, so a 135M model's answers parse and
validate whatever it would have written; what the grammar cannot enforce is a 400."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

MODEL = "smollm2"
MAX_TOKENS = 300

PROMPTS = [
    "Describe a cat as JSON.",
    "Give me a shopping list.",
    "What is the capital of France?",
    "Hello!",
]

# Hand-written schemas covering the supported subset: required properties, nested arrays of
# objects, enums, integer and number bounds, string patterns and lengths, a $defs reference.
# Arrays and numbers are bounded: unbounded, a 135M model may repeat items or digits until
# max_tokens (a valid prefix, finish_reason "length"), which tests the model, not the mask.
SCHEMAS = {
    "person": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "pattern": "^[A-Z][a-z]{1,15}$"},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "email": {"type": "string", "maxLength": 40},
        },
        "required": ["name", "age", "email"],
        "additionalProperties": False,
    },
    "order": {
        "type": "object",
        "properties": {
            "id": {"type": "integer", "minimum": 1},
            "lines": {
                "type": "array",
                "minItems": 1,
                "maxItems": 3,
                "items": {
                    "type": "object",
                    "properties": {
                        "sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{3}$"},
                        "qty": {"type": "integer", "minimum": 1, "maximum": 9},
                        "price": {"type": "number", "exclusiveMinimum": 0, "maximum": 1000},
                    },
                    "required": ["sku", "qty", "price"],
                    "additionalProperties": False,
                },
            },
        },
        "required": ["id", "lines"],
        "additionalProperties": False,
    },
    "choice": {
        "type": "object",
        "properties": {
            "answer": {"enum": ["yes", "no", "maybe"]},
            "confidence": {"type": "number", "minimum": 0, "maximum": 1},
            "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b", "c"]}, "maxItems": 4},
        },
        "required": ["answer", "confidence", "tags"],
        "additionalProperties": False,
    },
    "matrix": {
        "type": "object",
        "properties": {
            "rows": {
                "type": "array",
                "maxItems": 3,
                "items": {"type": "array", "maxItems": 3, "items": {"type": "integer", "minimum": -9, "maximum": 9}},
            },
            "label": {"anyOf": [{"type": "string", "maxLength": 12}, {"type": "null"}]},
        },
        "required": ["rows", "label"],
        "additionalProperties": False,
    },
    "refs": {
        "$defs": {"point": {"type": "object", "properties": {"x": {"type": "integer", "minimum": -99, "maximum": 99},
                                                             "y": {"type": "integer", "minimum": -99, "maximum": 99}},
                            "required": ["x", "y"], "additionalProperties": False}},
        "type": "object",
        "properties": {"start": {"$ref": "#/$defs/point"}, "end": {"$ref": "#/$defs/point"},
                       "closed": {"type": "boolean"}},
        "required": ["start", "end", "closed"],
        "additionalProperties": False,
    },
}


def json_schema_format(name: str, schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


def _ask(client, prompt: str, response_format: dict, **kw):
    return client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": prompt}], response_format=response_format,
        max_tokens=kw.pop("max_tokens", MAX_TOKENS), **kw)


@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 1, "seed": 1}, {"temperature": 1, "seed": 2}])
def test_json_object_is_always_an_object(client, sampling):
    # An unbounded object lets a 135M model repeat one key until max_tokens (then the answer
    # is a valid prefix with finish_reason "length", 3 of these 12 without a penalty); the
    # frequency penalty only reorders the tokens the grammar allows, and lets it finish.
    for prompt in PROMPTS:
        r = _ask(client, prompt, {"type": "json_object"}, frequency_penalty=1.0, **sampling)
        choice = r.choices[0]
        assert choice.finish_reason == "stop", choice.message.content
        assert isinstance(json.loads(choice.message.content), dict), choice.message.content


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_json_schema_outputs_validate(client, name):
    schema = SCHEMAS[name]
    for prompt, sampling in [(PROMPTS[0], {"temperature": 0}), (PROMPTS[1], {"temperature": 1, "seed": 7}),
                             (PROMPTS[3], {"temperature": 1, "seed": 8, "n": 2})]:
        r = _ask(client, prompt, json_schema_format(name, schema), **sampling)
        for choice in r.choices:
            text = choice.message.content
            assert choice.finish_reason == "stop", text
            jsonschema.validate(json.loads(text), schema)


class Address(BaseModel):
    city: str = Field(max_length=30)
    zip_code: str = Field(pattern=r"^[0-9]{5}$")


class Contact(BaseModel):
    name: str = Field(max_length=30)
    age: int = Field(ge=0, le=120)
    addresses: list[Address] = Field(min_length=1, max_length=2)
    vip: bool


def test_parse_with_a_pydantic_model(client):
    parse = getattr(client.chat.completions, "parse", None) or client.beta.chat.completions.parse
    r = parse(model=MODEL, messages=[{"role": "user", "content": "Invent a contact with one address."}],
              response_format=Contact, max_tokens=MAX_TOKENS, temperature=0)
    contact = r.choices[0].message.parsed
    assert isinstance(contact, Contact), r.choices[0].message.content
    assert all(isinstance(a, Address) for a in contact.addresses)


@pytest.mark.parametrize("schema,feature", [
    ({"type": "array", "uniqueItems": True}, "uniqueItems"),
    ({"type": "object", "not": {"required": ["a"]}}, "not"),
    # Overlapping branches: oneOf would need "exactly one" (disjoint ones compile as anyOf).
    ({"type": "object", "properties": {"a": {"oneOf": [{"type": "integer"}, {"type": "number"}]}}}, "oneOf"),
    ({"type": "string", "format": "credit-card"}, "credit-card"),
    ({"type": "object", "x-guidance": {"lenient": True}}, "x-guidance"),
])
def test_unenforceable_schema_is_a_400_naming_the_feature(client, schema, feature):
    with pytest.raises(openai.BadRequestError) as err:
        _ask(client, "Hi", json_schema_format("bad", schema))
    body = err.value.body
    assert body["param"] == "response_format", body
    assert feature in body["message"], body


@pytest.mark.parametrize("response_format,needle", [
    ({"type": "xml"}, "xml"),
    ({"type": "json_schema"}, "json_schema"),
    ({"type": "json_schema", "json_schema": {"schema": {"type": "object"}}}, "name"),
    ("json", "response_format"),
])
def test_malformed_response_format_is_a_400(server, response_format, needle):
    r = httpx.post(server.url + "/v1/chat/completions", json={
        "model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "response_format": response_format,
        "max_tokens": 5})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "response_format" and needle in err["message"], err


def test_text_format_is_free_text(client):
    r = _ask(client, "Say hi.", {"type": "text"}, max_tokens=8, temperature=0)
    plain = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Say hi."}],
                                           max_tokens=8, temperature=0)
    assert r.choices[0].message.content == plain.choices[0].message.content


def test_max_tokens_inside_a_document_is_length(client):
    schema = SCHEMAS["person"]
    full = _ask(client, PROMPTS[0], json_schema_format("person", schema), temperature=0)
    cut = _ask(client, PROMPTS[0], json_schema_format("person", schema), temperature=0, max_tokens=6)
    assert cut.choices[0].finish_reason == "length"
    assert full.choices[0].message.content.startswith(cut.choices[0].message.content)
    with pytest.raises(json.JSONDecodeError):
        json.loads(cut.choices[0].message.content)


def test_stream_equals_non_stream_under_a_schema(client):
    fmt = json_schema_format("order", SCHEMAS["order"])
    full = _ask(client, PROMPTS[1], fmt, temperature=0)
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": PROMPTS[1]}], response_format=fmt,
        max_tokens=MAX_TOKENS, temperature=0, stream=True)
    text, reason = [], None
    for chunk in stream:
        for c in chunk.choices:
            text.append(c.delta.content or "")
            reason = c.finish_reason or reason
    assert "".join(text) == full.choices[0].message.content
    assert reason == full.choices[0].finish_reason == "stop"


def test_completions_take_response_format(client):
    r = client.completions.create(model=MODEL, prompt="A JSON object describing a dog:", max_tokens=MAX_TOKENS,
                                  temperature=0, extra_body={"response_format": json_schema_format("c", SCHEMAS["choice"])})
    jsonschema.validate(json.loads(r.choices[0].text), SCHEMAS["choice"])


# Remote backends: an OpenAI-compatible upstream gets response_format as the client sent it;
# Triton cannot enforce it and says so.
def test_upstream_forwards_response_format(server):
    from ferroserve.backends.base import ChatRequest, Message, SamplingParams
    from tests.backends.test_upstream import backend, run_events, texts

    fmt = json_schema_format("choice", SCHEMAS["choice"])
    request = ChatRequest(messages=[Message("user", PROMPTS[2])], stream=False,
                          params=SamplingParams(max_tokens=MAX_TOKENS, temperature=0, response_format=fmt))
    [text] = texts(run_events(backend(server.url + "/v1"), request))
    jsonschema.validate(json.loads(text), SCHEMAS["choice"])
    bad = msgspec_replace(request, json_schema_format("bad", {"type": "array", "uniqueItems": True}))
    events = run_events(backend(server.url + "/v1"), bad)
    error = events[-1].error
    assert error.status == 400 and error.param == "response_format" and "uniqueItems" in error.message, error


def msgspec_replace(request, response_format):
    import msgspec

    return msgspec.structs.replace(request, params=msgspec.structs.replace(request.params, response_format=response_format))


def test_triton_refuses_response_format():
    import asyncio

    from ferroserve.backends.base import ChatRequest, Failed, SamplingParams
    from ferroserve.backends.triton import create
    from ferroserve.config import BackendSpec, ModelSpec
    from tests.conftest import free_port

    dead = BackendSpec(name="dead", kind="triton", base_url=f"127.0.0.1:{free_port()}", read_timeout_s=5)
    chat = create(ModelSpec(name="g", path="", kind="chat", upstream_model="gen"), dead, {})

    async def collect():
        return [e async for e in chat.generate(ChatRequest(prompt="x", params=SamplingParams(
            response_format={"type": "json_object"})))]

    [event] = asyncio.run(collect())
    assert isinstance(event, Failed) and event.error.status == 400 and event.error.param == "response_format"
