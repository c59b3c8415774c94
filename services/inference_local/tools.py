"""Tool calling for inference-local: tool validation, the constraint that forces a call, and the
parser that turns a generation's text into streamed tool-call deltas.

The call format is the one the bundled templates render and the grammar forces (Hermes style,
which Qwen and Hermes templates use natively too)::

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

one block per call, back to back (``</tool_call><tool_call>``): with a newline allowed between
two calls, a small model under greedy decoding takes the newline and goes on calling until
max_tokens; without it, it weighs the next call against ending its turn. How each tool choice
becomes a constraint:

- none: no tool constraint (the tools are still shown to the model); an output constraint of
  the request (response_format) applies as without tools. The output is not parsed for calls:
  a call the model writes anyway is text, and the finish reason is never TOOL_CALLS.
- auto: lazy: the text is free until the model writes the opener ``<tool_call>``; what follows it
  is forced to be one call (or several, when parallel calls are allowed) of the given tools. With
  an output constraint too, the grammar is not lazy: ``start: calls | <the response grammar>``,
  so the model either calls or answers in the requested shape.
- required: one call (or one or more when parallel), of any of the tools, from the first token.
- function: exactly one call of the named tool, from the first token (as OpenAI and vLLM force
  a named function: parallel calls do not apply).
  required and function ignore the output constraint: they admit no text answer for it to shape.

The arguments of every call are constrained by the tool's JSON schema (``%json``), with the
separators ``json.dumps`` writes, so a forced call reads like the calls the templates render. As
in llama.cpp, an object schema that lists its properties and says nothing of others admits no
others (``additionalProperties`` defaults to false). The schema is enforced whether or not a tool
is strict (the contract's rule); one the grammar engine cannot enforce fully is refused with
INVALID_ARGUMENT naming ``tools.tools[i].parameters``, never half enforced.
"""

from __future__ import annotations

import enum
import functools
import json
import re
import secrets
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

import llguidance

from inference_local.constraints import Constraint
from slm.errors import InvalidArgument

OPEN = "<tool_call>"
CLOSE = "</tool_call>"
NAME_RE = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
MAX_TOOLS = 128


class ChoiceMode(enum.Enum):
    NONE = "none"
    AUTO = "auto"
    REQUIRED = "required"
    FUNCTION = "function"


@dataclass(frozen=True)
class Tool:
    name: str
    description: str = ""
    # JSON Schema of the arguments object as JSON text; "" means any object.
    parameters: str = ""
    strict: bool = False


@dataclass(frozen=True)
class ToolChoice:
    mode: ChoiceMode = ChoiceMode.AUTO
    function_name: str = ""


@dataclass(frozen=True)
class ToolSpec:
    """The tools of a request, how the model may use them, and whether calls may be parallel."""

    tools: tuple[Tool, ...]
    choice: ToolChoice = ToolChoice()
    parallel: bool = True


@dataclass(frozen=True)
class ToolCall:
    """A complete call, as a conversation's history carries it."""

    id: str
    name: str
    # The arguments object as JSON text.
    arguments: str


@dataclass(frozen=True)
class ToolCallDelta:
    """A piece of a streamed call: the first carries index, id and name; later ones more of the
    arguments text, which concatenated is the arguments object."""

    index: int
    id: str = ""
    name: str = ""
    arguments: str = ""


def new_call_id() -> str:
    return "call_" + secrets.token_urlsafe(18)[:24]


def schemas(spec: ToolSpec) -> list[dict[str, Any]]:
    """Validate the tools and return each one's parameters schema (parsed); InvalidArgument
    names the offending field."""
    if not spec.tools:
        raise InvalidArgument("tools must not be empty", field="tools.tools")
    if len(spec.tools) > MAX_TOOLS:
        raise InvalidArgument(f"at most {MAX_TOOLS} tools are allowed", field="tools.tools")
    seen: set[str] = set()
    parsed = []
    for i, tool in enumerate(spec.tools):
        if not NAME_RE.match(tool.name):
            raise InvalidArgument(
                f"tool name {tool.name!r} must match ^[a-zA-Z0-9_-]{{1,64}}$",
                field=f"tools.tools[{i}].name",
            )
        if tool.name in seen:
            raise InvalidArgument(
                f"tool name {tool.name!r} is given twice", field=f"tools.tools[{i}].name"
            )
        seen.add(tool.name)
        where = f"tools.tools[{i}].parameters"
        params = _parameters(tool.parameters, where)
        # Checked tool by tool, so the error names the tool (the whole grammar compiles later).
        error = _schema_error(_arguments_schema(params))
        if error:
            raise InvalidArgument(
                f"the arguments schema cannot be enforced: {error[:500]}", field=where
            )
        parsed.append(params)
    choice = spec.choice
    if choice.mode is ChoiceMode.FUNCTION:
        if choice.function_name not in seen:
            raise InvalidArgument(
                f"tool choice names {choice.function_name!r}, which is not among the tools",
                field="tools.choice.function_name",
            )
    elif choice.function_name:
        raise InvalidArgument(
            "function_name is only allowed with the function tool choice",
            field="tools.choice.function_name",
        )
    return parsed


def _parameters(text: str, where: str) -> dict[str, Any]:
    if not text.strip():
        return {"type": "object"}
    try:
        schema = json.loads(text)
    except ValueError as error:
        raise InvalidArgument(f"not JSON: {error}", field=where) from error
    if not isinstance(schema, dict):
        raise InvalidArgument("must be a JSON Schema object", field=where)
    kind = schema.get("type", "object")
    if kind != "object" and not (isinstance(kind, list) and "object" in kind):
        raise InvalidArgument(
            f"the arguments of a tool are an object; this schema's type is {kind!r}", field=where
        )
    return schema


def openai_tools(spec: ToolSpec, parsed: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The tools in OpenAI's function-tool shape, as chat templates expect them."""
    out = []
    for tool, params in zip(spec.tools, parsed, strict=True):
        function: dict[str, Any] = {"name": tool.name}
        if tool.description:
            function["description"] = tool.description
        function["parameters"] = params
        out.append({"type": "function", "function": function})
    return out


def constraint(
    spec: ToolSpec, parsed: Sequence[dict[str, Any]], response: Constraint | None
) -> Constraint | None:
    """The constraint a tool choice asks for (see the module docstring); `response` is the
    request's output constraint, which auto offers beside the calls."""
    mode = spec.choice.mode
    if mode is ChoiceMode.NONE:
        return response
    tools = list(zip(spec.tools, parsed, strict=True))
    if mode is ChoiceMode.FUNCTION:
        tools = [(t, p) for t, p in tools if t.name == spec.choice.function_name]
    rules = _function_rules(tools)
    body = " | ".join(f"tool_fn_{i}" for i in range(len(tools)))
    parallel = spec.parallel and mode is not ChoiceMode.FUNCTION
    more = "(tool_call)*" if parallel else ""
    calls = [
        f"tool_call: {json.dumps(OPEN + chr(10))} tool_fn {json.dumps(chr(10) + CLOSE)}",
        f"tool_fn: {body}",
        *rules,
    ]
    if mode is ChoiceMode.AUTO and response is None:
        # The trigger has been written when the grammar takes over: it starts right after it.
        first = f'"\\n" tool_fn {json.dumps(chr(10) + CLOSE)}'
        lark = "\n".join([f"start: {first} {more}".rstrip(), *calls])
        return Constraint(lark=lark, kind="tool_calls", trigger=OPEN)
    start = f"tool_calls: tool_call {more}".rstrip()
    if mode is ChoiceMode.AUTO and response is not None:
        lark = "\n".join(
            ["start: tool_calls | response_text", start, *calls, _renamed_start(response.lark)]
        )
        return Constraint(lark=lark, kind=f"tool_calls|{response.kind}")
    lark = "\n".join(["start: tool_calls", start, *calls])
    return Constraint(lark=lark, kind="tool_calls")


def _closed(schema: Any) -> Any:
    """The schema with every object that lists its properties closed to others, unless it says
    otherwise: llama.cpp's grammars do the same, because a small model left free to add
    properties tends to go on adding them (copying the schema's own keywords)."""
    if isinstance(schema, list):
        return [_closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key in ("properties", "$defs", "definitions", "patternProperties"):
            out[key] = (
                {k: _closed(v) for k, v in value.items()} if isinstance(value, dict) else value
            )
        elif key in ("items", "prefixItems", "anyOf", "oneOf", "allOf", "additionalProperties"):
            out[key] = _closed(value)
        else:
            out[key] = value
    if "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def _arguments_schema(params: dict[str, Any]) -> str:
    """The `%json` body that constrains a tool's arguments, as JSON text."""
    schema = _closed(params)
    # The separators json.dumps writes (and the templates render), no free whitespace: a small
    # model would otherwise drift into runs of blanks. Not lenient: the contract enforces the
    # schema whether or not the tool is strict, so keywords the grammar engine cannot enforce
    # (uniqueItems...) refuse the request instead of being skipped.
    schema["x-guidance"] = {
        "whitespace_flexible": False,
        "key_separator": ": ",
        "item_separator": ", ",
        "lenient": False,
        **schema.get("x-guidance", {}),
    }
    return json.dumps(schema)


@functools.lru_cache(maxsize=256)
def _schema_error(arguments_schema: str) -> str:
    """Why the grammar engine cannot compile a tool's arguments schema ("" when it can)."""
    grammar = llguidance.grammar_from("lark", f"start: %json {arguments_schema}")
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
    return messages[0] if is_error else ""


def _function_rules(tools: Sequence[tuple[Tool, dict[str, Any]]]) -> list[str]:
    rules = []
    for i, (tool, params) in enumerate(tools):
        head = '{"name": ' + json.dumps(tool.name) + ', "arguments": '
        rules.append(f'tool_fn_{i}: {json.dumps(head)} tool_args_{i} "}}"')
        rules.append(f"tool_args_{i}: %json {_arguments_schema(params)}")
    return rules


_START_RULE = re.compile(r"^start(\s*:)", re.MULTILINE)


def _renamed_start(lark: str) -> str:
    """The response grammar with its start rule renamed, to sit beside the calls."""
    renamed, count = _START_RULE.subn(r"response_text\1", lark)
    if count != 1:
        raise InvalidArgument(
            "this output constraint cannot be combined with tools under tool choice auto",
            field="sampling.constraint",
        )
    return renamed


# --- parsing the generated text --------------------------------------------------------------


class _State(enum.Enum):
    TEXT = 0
    HEAD = 1
    ARGS = 2
    TAIL = 3


class _Partial:
    """The text so far may still become the pattern."""


_PARTIAL = _Partial()
_WS = " \t\r\n"
_STRING = object()
# The head of a call up to the `{` that opens its arguments, and the end of a call; None stands
# for optional whitespace, _STRING for a JSON string.
_HEAD: tuple[object, ...] = (
    None, "{", None, '"name"', None, ":", None, _STRING, None, ",", None, '"arguments"', None,
    ":", None, "{",
)  # fmt: skip
_TAIL: tuple[object, ...] = (None, "}", None, CLOSE)


def _match(pattern: tuple[object, ...], text: str) -> tuple[int, str] | _Partial | None:
    """Match `pattern` at the start of `text`: (end, the JSON string's text) when it matches,
    _PARTIAL when `text` is a proper start of a match, None when it cannot match."""
    pos, string = 0, ""
    for piece in pattern:
        if piece is None:
            while pos < len(text) and text[pos] in _WS:
                pos += 1
            continue
        if pos == len(text):
            return _PARTIAL
        if piece is _STRING:
            if text[pos] != '"':
                return None
            end = pos + 1
            while end < len(text) and text[end] != '"':
                end += 2 if text[end] == "\\" else 1
            if end >= len(text):
                return _PARTIAL
            string, pos = text[pos : end + 1], end + 1
            continue
        assert isinstance(piece, str)
        got = text[pos : pos + len(piece)]
        if got != piece:
            return _PARTIAL if len(got) < len(piece) and piece.startswith(got) else None
        pos += len(piece)
    return pos, string


@dataclass
class ToolCallParser:
    """Splits a choice's generated text into content and tool-call deltas, incrementally.

    Content is passed through until the call opener; a possible start of the opener at the end
    of a delta is held back until the next delta says what it is. Inside a call the arguments
    object is streamed as it arrives (a JSON scanner knows where it ends, so nothing of it is
    held back). Text that turns out not to be a well-formed call is passed on as content.
    """

    # The tool names a call may have; a call of another name is content.
    names: Collection[str] = ()
    calls: list[ToolCall] = field(default_factory=list)
    _state: _State = _State.TEXT
    _buffer: str = ""
    _id: str = ""
    _name: str = ""
    _args: list[str] = field(default_factory=list)
    _depth: int = 0
    _in_string: bool = False
    _escaped: bool = False

    @property
    def called(self) -> bool:
        return bool(self.calls) or self._state in (_State.ARGS, _State.TAIL)

    def feed(self, text: str) -> tuple[str, list[ToolCallDelta]]:
        """Content and call pieces of the next delta of generated text."""
        self._buffer += text
        content: list[str] = []
        deltas: list[ToolCallDelta] = []
        while self._step(content, deltas):
            pass
        return "".join(content), deltas

    def finish(self) -> tuple[str, list[ToolCallDelta]]:
        """What the held-back text turned out to be once the generation has ended."""
        rest, self._buffer = self._buffer, ""
        if self._state is _State.TEXT:
            return ("" if self.calls and not rest.strip() else rest), []
        if self._state is _State.HEAD:
            self._state = _State.TEXT
            # A call cut short before its arguments (max_tokens) is no text the model meant to
            # say; the finish reason tells the client it was cut.
            return ("" if _match(_HEAD, rest) is _PARTIAL else OPEN + rest), []
        # A call cut short (max_tokens): what there is of its arguments has been sent already.
        return "", []

    def _step(self, content: list[str], deltas: list[ToolCallDelta]) -> bool:
        """Consume what the buffer allows; False when it needs more text."""
        buf = self._buffer
        if self._state is _State.TEXT:
            at = buf.find(OPEN)
            if at >= 0:
                # Blank lines between two calls are no content of their own.
                before = buf[:at]
                if not (self.calls and not before.strip()):
                    content.append(before)
                self._buffer = buf[at + len(OPEN) :]
                self._state = _State.HEAD
                return True
            keep = _partial_suffix(buf, OPEN)
            out = buf[: len(buf) - keep]
            if self.calls and not out.strip():
                return False
            content.append(out)
            self._buffer = buf[len(out) :]
            return False
        if self._state is _State.HEAD:
            head = _match(_HEAD, buf)
            if head is _PARTIAL:
                return False
            name = _json_string(head[1]) if isinstance(head, tuple) else None
            if (
                isinstance(head, tuple)
                and name is not None
                and (not self.names or name in self.names)
            ):
                self._id, self._name = new_call_id(), name
                self._args = []
                self._depth, self._in_string, self._escaped = 0, False, False
                self._state = _State.ARGS
                # The arguments start with the `{` the head ends on.
                self._buffer = buf[head[0] - 1 :]
                deltas.append(ToolCallDelta(len(self.calls), self._id, name, ""))
                return True
            # Not a call after all: the opener and what followed it are text.
            content.append(OPEN)
            self._state = _State.TEXT
            return True
        if self._state is _State.ARGS:
            end = self._scan(buf)
            piece = buf if end is None else buf[:end]
            if piece:
                self._args.append(piece)
                deltas.append(ToolCallDelta(len(self.calls), arguments=piece))
            self._buffer = "" if end is None else buf[end:]
            if end is None:
                return False
            self._state = _State.TAIL
            return True
        tail = _match(_TAIL, buf)
        if tail is _PARTIAL:
            return False
        # A call whose closing is malformed still counts: its arguments are complete.
        self.calls.append(ToolCall(self._id, self._name, "".join(self._args)))
        self._buffer = buf[tail[0] :] if isinstance(tail, tuple) else buf
        self._state = _State.TEXT
        return True

    def _scan(self, text: str) -> int | None:
        """Where the arguments object ends in `text` (the index after its `}`), if it does."""
        for i, ch in enumerate(text):
            if self._in_string:
                if self._escaped:
                    self._escaped = False
                elif ch == "\\":
                    self._escaped = True
                elif ch == '"':
                    self._in_string = False
            elif ch == '"':
                self._in_string = True
            elif ch in "{[":
                self._depth += 1
            elif ch in "}]":
                self._depth -= 1
                if self._depth == 0:
                    return i + 1
        return None


def _json_string(text: str) -> str | None:
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, str) else None


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of `text` that is a proper start of `marker`."""
    for size in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-size:]):
            return size
    return 0
