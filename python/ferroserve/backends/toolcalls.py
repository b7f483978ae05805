"""Tool calls on a local model: the grammar that constrains them and the parser that turns
the model's text back into calls.

The wire format is the one the rendered prompt asks for (the engine's `tool_format`, see
chat_template.rs): Hermes' for our own lowering and templates such as Qwen's,

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

one block per call, blocks separated by a newline; Mistral's `[TOOL_CALLS][{...}, {...}]`; or
Llama 3's bare `{"name": ..., "parameters": {...}}`. Each is a `ToolFormat`: text around the
calls and around each call, and the arguments' key. The grammar is llguidance Lark with each
function's `{"name": <const>, "<arguments key>": <its parameters schema>}` embedded as `%json`,
so every call the engine emits names an allowed function and its arguments validate:

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


class ToolFormat(msgspec.Struct, frozen=True, kw_only=True):
    """How an answer made of calls is written: `open`, then each call object between
    `call_open` and `call_close`, `separator` between calls, then `close`."""

    name: str
    open: str = ""
    call_open: str = ""
    call_close: str = ""
    separator: str
    close: str = ""
    arguments_key: str = "arguments"

    @property
    def prefix(self) -> str:
        """What every answer made of calls begins with (the grammar's JSON has fixed spacing)."""
        return self.open + self.call_open + '{"name"'

    @property
    def trigger(self) -> str:
        """Text that marks a call: under `auto`, free text never contains it."""
        return (self.open + self.call_open).strip() or '{"name"'


FORMATS = {f.name: f for f in (
    ToolFormat(name="hermes", call_open="<tool_call>\n", call_close="\n</tool_call>", separator="\n"),
    ToolFormat(name="mistral", open="[TOOL_CALLS][", separator=", ", close="]"),
    ToolFormat(name="llama3_json", separator="; ", arguments_key="parameters"),
)}
HERMES = FORMATS["hermes"]
# The separators the prompt's JSON uses (json.dumps'), and no free whitespace: a model cannot
# stall in endless newlines inside a call.
_JSON_OPTIONS = {"item_separator": ", ", "key_separator": ": ", "whitespace_flexible": False}
_REGEX_SPECIAL = set("\\.+*?()|[]{}^$#&-~")


def _lark_literal(text: str) -> str:
    return _encode(text).decode()


def _regex_literal(text: str) -> str:
    return "".join("\\" + ch if ch in _REGEX_SPECIAL else ch for ch in text)

_encode = msgspec.json.Encoder().encode


def _call_schema(tool: Tool, arguments_key: str) -> dict[str, Any]:
    parameters = dict(tool.parameters) if tool.parameters else {"type": "object"}
    if "x-guidance" in parameters:
        raise invalid(f"tools: the parameters of {tool.name!r} use `x-guidance`, which is not supported.", param="tools")
    schema: dict[str, Any] = {
        "type": "object",
        "properties": {"name": {"const": tool.name}},
        "required": ["name", arguments_key],
        "additionalProperties": False,
        "x-guidance": _JSON_OPTIONS,
    }
    # Local references (`#/$defs/...`) are relative to the document's root: the call object
    # is the root now, so the definitions move up to it.
    for key in ("$defs", "definitions"):
        if key in parameters:
            schema[key] = parameters.pop(key)
    schema["properties"][arguments_key] = parameters
    return schema


def lark_grammar(tools: list[Tool], choice: str, function: str | None, parallel: bool,
                 text_schema: dict[str, Any] | None = None, fmt: ToolFormat = HERMES) -> str:
    """The grammar of an answer under `choice` ("auto", "required" or "function" with
    `function` named), calls written in `fmt`. Under `auto`, `text_schema` (a
    response_format's JSON schema) replaces free text."""
    allowed = [t for t in tools if choice != "function" or t.name == function]
    rules = [f"fn_{i}: %json {_encode(_call_schema(t, fmt.arguments_key)).decode()}" for i, t in enumerate(allowed)]
    body = " | ".join(f"fn_{i}" for i in range(len(allowed)))

    def seq(*parts: str) -> str:  # Lark has no empty literal: leave empty parts out
        return " ".join(p for p in parts if p and p != '""')

    call = seq(_lark_literal(fmt.call_open), f"({body})", _lark_literal(fmt.call_close))
    more = f'({_lark_literal(fmt.separator)} call)*' if parallel else ""
    lines = [f"call: {call}", "calls: " + seq(_lark_literal(fmt.open), "call", more, _lark_literal(fmt.close))]
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
        lines.append(f"TEXT: /(?s:.*)/ & ~/(?s:.*){_regex_literal(fmt.trigger)}(?s:.*)/")
    return "\n".join(lines + rules) + "\n"


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def _header(arguments_key: str) -> re.Pattern[str]:
    return re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"' + re.escape(arguments_key) + r'"\s*:\s*')


_HEADERS = {name: _header(f.arguments_key) for name, f in FORMATS.items()}
_START, _TEXT, _HEADER_STATE, _ARGS, _TAIL, _BETWEEN = range(6)


class ToolCallParser:
    """One choice's answer → text deltas or tool-call deltas, incrementally.

    An answer that starts with the marker is calls; any other answer is text (the grammar
    allows nothing else). `feed` returns the events for the text so far."""

    __slots__ = ("index", "fmt", "header", "state", "buffer", "calls", "depth", "in_string", "escape", "started", "scalar")

    def __init__(self, index: int, fmt: ToolFormat = HERMES) -> None:
        self.index = index
        self.fmt = fmt
        self.header = _HEADERS.get(fmt.name) or _header(fmt.arguments_key)
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
            fmt = self.fmt
            if state == _START:
                prefix = fmt.prefix
                if buf.startswith(prefix):
                    self.buffer = buf[len(fmt.open + fmt.call_open):]
                    self.state = _HEADER_STATE
                elif prefix.startswith(buf):
                    return out  # may still become a call
                else:
                    self.state = _TEXT
                    self.buffer = ""
                    out.append(buf)
                    return out
            elif state == _HEADER_STATE:
                m = self.header.match(buf)
                if m is None:
                    return out
                name = msgspec.json.decode(('"' + m.group(1) + '"').encode())
                out.append(ToolCallDelta(self.index, self.calls, new_call_id(), name, ""))
                self.buffer = buf[m.end():]
                self.state = _ARGS
                self._reset_args()
            elif state == _ARGS:
                if not self.started:
                    buf = buf.lstrip()  # the space after the key's colon is not part of them
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
            elif state == _TAIL:  # the call object's "}" and the call's closing text
                end = "}" + fmt.call_close
                at = buf.find(end)
                if at < 0:
                    return out
                self.buffer = buf[at + len(end):]
                self.state = _BETWEEN
            else:  # _BETWEEN: the next call, or the end (the grammar allows nothing else)
                following = fmt.separator + fmt.call_open
                if buf.startswith(following):
                    self.buffer = buf[len(following):]
                    self.state = _HEADER_STATE
                else:
                    if not (following.startswith(buf) or fmt.close.startswith(buf)):
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
