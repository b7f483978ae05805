"""Tool calls on a local model: the grammar that constrains them and the parser that turns
the model's text back into calls.

The wire format is Hermes' (what the built-in tool prompt asks for, see chat_template.rs):

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

one block per call, blocks separated by a newline. The grammar is llguidance Lark with each
function's `{"name": <const>, "arguments": <its parameters schema>}` embedded as `%json`, so
every call the engine emits names an allowed function and its arguments validate:

- `required` / a named function: the answer is one call (`parallel_tool_calls` false) or one
  or more, from the first token;
- `auto`: the answer is either text that never contains the marker, or calls (so a call is
  constrained from its first marker token on, and text cannot smuggle an unchecked one).

The parser reads the same text incrementally: header (id, name) as soon as the name is
complete, then the arguments as they arrive, so a stream's fragments concatenate to exactly
the non-streamed arguments.
"""

from __future__ import annotations

import re
import uuid
from typing import Any

import msgspec

from ferroserve.backends.base import Tool, ToolCallDelta
from ferroserve.errors import invalid

MARKER = "<tool_call>"
END_MARKER = "</tool_call>"
# The separators the prompt's JSON uses (json.dumps'), and no free whitespace: a model cannot
# stall in endless newlines inside a call.
_JSON_OPTIONS = {"item_separator": ", ", "key_separator": ": ", "whitespace_flexible": False}
# Free text under `auto`: anything without the call marker.
_FREE_TEXT = 'TEXT: /(?s:.*)/ & ~/(?s:.*)<tool_call>(?s:.*)/'

_encode = msgspec.json.Encoder().encode


def _call_schema(tool: Tool) -> dict[str, Any]:
    parameters = dict(tool.parameters) if tool.parameters else {"type": "object"}
    if "x-guidance" in parameters:
        raise invalid(f"tools: the parameters of {tool.name!r} use `x-guidance`, which is not supported.", param="tools")
    schema: dict[str, Any] = {
        "type": "object",
        "properties": {"name": {"const": tool.name}},
        "required": ["name", "arguments"],
        "additionalProperties": False,
        "x-guidance": _JSON_OPTIONS,
    }
    # Local references (`#/$defs/...`) are relative to the document's root: the call object
    # is the root now, so the definitions move up to it.
    for key in ("$defs", "definitions"):
        if key in parameters:
            schema[key] = parameters.pop(key)
    schema["properties"]["arguments"] = parameters
    return schema


def lark_grammar(tools: list[Tool], choice: str, function: str | None, parallel: bool,
                 text_schema: dict[str, Any] | None = None) -> str:
    """The grammar of an answer under `choice` ("auto", "required" or "function" with
    `function` named). Under `auto`, `text_schema` (a response_format's JSON schema) replaces
    free text."""
    allowed = [t for t in tools if choice != "function" or t.name == function]
    rules = [f"fn_{i}: %json {_encode(_call_schema(t)).decode()}" for i, t in enumerate(allowed)]
    body = " | ".join(f"fn_{i}" for i in range(len(allowed)))
    lines = [
        'call: "<tool_call>\\n" (' + body + ') "\\n</tool_call>"',
        'calls: call ("\\n" call)*' if parallel else "calls: call",
    ]
    if choice != "auto":
        lines.insert(0, "start: calls")
    elif text_schema is not None:
        if isinstance(text_schema, dict) and "x-guidance" in text_schema:
            raise invalid("response_format: the schema keyword `x-guidance` is not supported", param="response_format")
        lines.insert(0, "start: text | calls")
        text = {**text_schema, "x-guidance": _JSON_OPTIONS} if isinstance(text_schema, dict) else text_schema
        lines.append(f"text: %json {_encode(text).decode()}")
    else:
        lines.insert(0, "start: TEXT | calls")
        lines.append(_FREE_TEXT)
    return "\n".join(lines + rules) + "\n"


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


_HEADER = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*')
_START, _TEXT, _HEADER_STATE, _ARGS, _TAIL, _BETWEEN = range(6)


class ToolCallParser:
    """One choice's answer → text deltas or tool-call deltas, incrementally.

    An answer that starts with the marker is calls; any other answer is text (the grammar
    allows nothing else). `feed` returns the events for the text so far."""

    __slots__ = ("index", "state", "buffer", "calls", "depth", "in_string", "escape", "started", "scalar")

    def __init__(self, index: int) -> None:
        self.index = index
        self.state = _START
        self.buffer = ""
        self.calls = 0
        self._reset_args()

    def _reset_args(self) -> None:
        self.depth = 0
        self.in_string = False
        self.escape = False
        self.started = False
        self.scalar = False

    def feed(self, text: str) -> list[str | ToolCallDelta]:
        """Text pieces (str) and tool-call deltas, in order."""
        out: list[str | ToolCallDelta] = []
        if self.state == _TEXT:
            if text:
                out.append(text)
            return out
        self.buffer += text
        while True:
            state = self.state
            buf = self.buffer
            if state == _START:
                if buf.startswith(MARKER):
                    self.buffer = buf[len(MARKER):]
                    self.state = _HEADER_STATE
                elif MARKER.startswith(buf):
                    return out  # may still become the marker
                else:
                    self.state = _TEXT
                    self.buffer = ""
                    out.append(buf)
                    return out
            elif state == _HEADER_STATE:
                m = _HEADER.match(buf)
                if m is None:
                    return out
                name = msgspec.json.decode(('"' + m.group(1) + '"').encode())
                out.append(ToolCallDelta(self.index, self.calls, new_call_id(), name, ""))
                self.buffer = buf[m.end():]
                self.state = _ARGS
                self._reset_args()
            elif state == _ARGS:
                if not self.started:
                    buf = buf.lstrip()  # the space after "arguments": is not part of them
                    if not buf:
                        self.buffer = ""
                        return out
                end = self._scan_arguments(buf)
                piece = buf if end is None else buf[:end]
                if piece:
                    out.append(ToolCallDelta(self.index, self.calls, None, None, piece))
                if end is None:
                    self.buffer = ""
                    return out
                self.buffer = buf[end:]
                self.calls += 1
                self.state = _TAIL
            elif state == _TAIL:
                at = buf.find(END_MARKER)
                if at < 0:
                    return out
                self.buffer = buf[at + len(END_MARKER):]
                self.state = _BETWEEN
            else:  # _BETWEEN: the next call, or nothing (the grammar allows no text here)
                rest = buf.lstrip()
                if rest.startswith(MARKER):
                    self.buffer = rest[len(MARKER):]
                    self.state = _HEADER_STATE
                else:
                    if not MARKER.startswith(rest):
                        self.buffer = ""
                    return out

    def _scan_arguments(self, buf: str) -> int | None:
        """Where the arguments value ends in `buf` (None: not yet), tracking nesting and
        strings across calls."""
        for i, ch in enumerate(buf):
            if self.in_string:
                if self.escape:
                    self.escape = False
                elif ch == "\\":
                    self.escape = True
                elif ch == '"':
                    self.in_string = False
                    if self.depth == 0:
                        return i + 1
                continue
            if self.scalar:
                if ch in ",}] \n\t\r":
                    return i
                continue
            if ch == '"':
                self.in_string = True
                self.started = True
            elif ch in "{[":
                self.depth += 1
                self.started = True
            elif ch in "}]":
                self.depth -= 1
                if self.depth == 0:
                    return i + 1
            elif not self.started and not ch.isspace():
                self.scalar = True
                self.started = True
        return None

    @property
    def answered_with_calls(self) -> bool:
        return self.state not in (_START, _TEXT)

    def finish(self) -> list[str]:
        """What is left when the answer ended: text still held back (a prefix of the marker)."""
        if self.state == _START:
            text, self.buffer = self.buffer, ""
            self.state = _TEXT
            return [text] if text else []
        return []
