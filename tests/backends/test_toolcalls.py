"""The tool-call parser and grammar of each `ToolFormat`, on text written the way the grammar
makes models write it: fed whole and one character at a time (a stream's worst case), the
calls come out the same, with the arguments' fragments concatenating to the arguments."""

from __future__ import annotations

import json

import pytest

from ferroserve.backends.base import Tool, ToolCallDelta
from ferroserve.backends.toolcalls import FORMATS, ToolCallParser, lark_grammar

CALLS = [("get_weather", {"city": "Paris", "unit": "celsius"}), ("get_time", {"zone": "Europe/Paris", "n": [1, {"a": "}"}]})]


def _written(fmt, calls) -> str:
    objects = [fmt.call_open + json.dumps({"name": n, fmt.arguments_key: a}) + fmt.call_close for n, a in calls]
    return fmt.open + fmt.separator.join(objects) + fmt.close


def _run(fmt, text: str, step: int) -> tuple[str, list[tuple[str, str]]]:
    parser = ToolCallParser(0, fmt)
    events = []
    for i in range(0, len(text), step):
        events += parser.feed(text[i:i + step])
    events += parser.finish()
    plain = "".join(e for e in events if isinstance(e, str))
    calls: list[list[str]] = []
    for e in events:
        if isinstance(e, ToolCallDelta):
            if e.name is not None:
                assert e.call_index == len(calls) and e.id.startswith("call_")
                calls.append([e.name, ""])
            calls[e.call_index][1] += e.arguments
    return plain, [(n, a) for n, a in calls]


@pytest.mark.parametrize("name", sorted(FORMATS))
@pytest.mark.parametrize("step", [1, 3, 1000])
def test_calls_parse_whole_and_in_pieces(name, step):
    fmt = FORMATS[name]
    for calls in (CALLS[:1], CALLS):
        plain, parsed = _run(fmt, _written(fmt, calls), step)
        assert plain == ""
        assert [(n, json.loads(a)) for n, a in parsed] == calls


@pytest.mark.parametrize("name", sorted(FORMATS))
@pytest.mark.parametrize("text", ["It is sunny in Paris.", "[1, 2]", "<tool", "{\"x\": 1}", ""])
def test_text_answers_stay_text(name, text):
    plain, parsed = _run(FORMATS[name], text, 1)
    assert plain == text and parsed == []


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_grammar_writes_the_format(name):
    fmt = FORMATS[name]
    tools = [Tool(name="get_weather", parameters={"type": "object"})]
    parallel = lark_grammar(tools, "required", None, True, fmt=fmt)
    single = lark_grammar(tools, "required", None, False, fmt=fmt)
    auto = lark_grammar(tools, "auto", None, True, fmt=fmt)
    assert f'"required":["name","{fmt.arguments_key}"]' in parallel
    assert f"({json.dumps(fmt.separator)} call)*" in parallel and "call)*" not in single
    for part in (fmt.open, fmt.call_open, fmt.call_close, fmt.close):
        if part:
            assert json.dumps(part) in single
    assert auto.startswith("start: TEXT | calls") and "start: calls" in single
