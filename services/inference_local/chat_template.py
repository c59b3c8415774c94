"""Renders chat messages, tools, tool calls and tool results into a prompt with a model's Jinja
chat template.

Two paths, chosen once per template by rendering probes:

- native: the template renders tools (a marker tool shows up in its output) and renders an
  assistant's tool calls in the ``<tool_call>`` format (see tools.py), as Hermes, Qwen and the
  bundled Gemma template (config.GEMMA_CHAT_TEMPLATE) do. It gets the request's tools in
  OpenAI's function-tool shape, assistant messages with ``tool_calls`` in OpenAI's shape
  (``{"id", "type": "function", "function": {"name", "arguments"}}``, the arguments parsed into
  an object, or left as JSON text for templates that print them as they are: probed, as
  llama-server's --jinja does), tool messages with ``tool_call_id`` and ``name``.
- inline: any other template. The tools and calls are written into the messages themselves, in
  the same format the Gemma template renders, so the model sees the format the grammar forces:

  - the tools preamble (``tools_preamble``) is appended to the system message (one is added
    when there is none): the tools as JSON inside ``<tools></tools>``, then how to call one;
  - an assistant's calls follow its content (after a newline), one ``<tool_call>`` block each,
    back to back;
  - tool results become a user message, consecutive results one message, each as
    ``<tool_response id="call_..." name="get_weather">`` + newline + content + newline +
    ``</tool_response>``.

A tool message without a name takes the name of the call it answers.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from inference_local.tools import CLOSE, OPEN, ToolCall
from slm.errors import InvalidArgument

TOOLS_HEAD = (
    "# Tools\n\nYou may call one or more functions to help with the request. Their signatures, "
    "as JSON Schema, are inside <tools></tools>:\n<tools>\n"
)
TOOLS_TAIL = (
    "</tools>\n\nTo call a function, answer with its name and arguments as a JSON object in a "
    "tool_call block, one block per call:\n<tool_call>\n"
    '{"name": <function name>, "arguments": <arguments object>}\n</tool_call>'
)

_PROBE_TOOL = "probe_tool_3f9c"
_PROBE_ARG = "probe_arg_3f9c"


@dataclass(frozen=True)
class Message:
    role: str
    content: str
    name: str = ""
    # role "assistant": the calls this turn made.
    tool_calls: tuple[ToolCall, ...] = ()
    # role "tool": the id of the call whose result `content` is.
    tool_call_id: str = ""


def tools_preamble(tools: Sequence[Mapping[str, Any]]) -> str:
    """What the bundled templates say about the tools, before the conversation."""
    return TOOLS_HEAD + "".join(_tojson(t) + "\n" for t in tools) + TOOLS_TAIL


def tool_call_block(name: str, arguments: str) -> str:
    return f'{OPEN}\n{{"name": {_tojson(name)}, "arguments": {arguments}}}\n{CLOSE}'


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Transformers' tojson, which chat templates are written for: Jinja's own escapes <, > and
    # & for HTML, which would show the model \u003c where the text says <.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


class ChatTemplate:
    """A compiled template; sandboxed because templates may come from untrusted GGUF files."""

    def __init__(self, source: str, bos_token: str, eos_token: str) -> None:
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

        def raise_exception(message: str) -> None:
            raise InvalidArgument(f"chat template: {message}", field="messages")

        def strftime_now(fmt: str) -> str:
            return datetime.datetime.now().strftime(fmt)

        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = strftime_now
        env.filters["tojson"] = _tojson
        self._template = env.from_string(source)
        self._bos = bos_token
        self._eos = eos_token
        self.native_tools, self._object_arguments = self._probe()

    def render(
        self,
        messages: Sequence[Message],
        tools: Sequence[Mapping[str, Any]] | None = None,
        add_generation_prompt: bool = True,
    ) -> str:
        """The prompt for `messages` and, when given, the tools in OpenAI's function-tool shape."""
        has_tool_turns = any(m.tool_calls or m.role == "tool" for m in messages)
        if self.native_tools or not (tools or has_tool_turns):
            dicts = _dicts(messages, self._object_arguments)
            return self._render(dicts, list(tools) if tools else None, add_generation_prompt)
        return self._render(_inline(messages, tools or ()), None, add_generation_prompt)

    def _render(
        self,
        messages: list[dict[str, Any]],
        tools: list[Mapping[str, Any]] | None,
        add_generation_prompt: bool,
    ) -> str:
        extra: dict[str, Any] = {} if tools is None else {"tools": tools}
        try:
            return self._template.render(
                messages=messages,
                bos_token=self._bos,
                eos_token=self._eos,
                add_generation_prompt=add_generation_prompt,
                **extra,
            )
        except jinja2.TemplateError as error:
            raise InvalidArgument(f"chat template failed: {error}", field="messages") from error

    def _probe(self) -> tuple[bool, bool]:
        """Whether the template renders tools and `<tool_call>` blocks itself, and whether it
        wants a call's arguments as an object (else as JSON text)."""
        tool = {"type": "function", "function": {"name": _PROBE_TOOL, "parameters": {}}}
        user: dict[str, Any] = {"role": "user", "content": "Hi"}
        try:
            shown = _PROBE_TOOL in self._render([user], [tool], True)
        except (InvalidArgument, TypeError, ValueError):
            return False, True
        if not shown:
            return False, True
        for as_object in (True, False):
            arguments: Any = {_PROBE_ARG: 1} if as_object else json.dumps({_PROBE_ARG: 1})
            call = {
                "id": "call_probe",
                "type": "function",
                "function": {"name": _PROBE_TOOL, "arguments": arguments},
            }
            turns: list[dict[str, Any]] = [
                user,
                {"role": "assistant", "content": "", "tool_calls": [call]},
            ]
            try:
                text = self._render(turns, [tool], False)
            except (InvalidArgument, TypeError, ValueError):
                continue
            if OPEN in text and f'"{_PROBE_ARG}": 1' in text:
                return True, as_object
        return False, True


def _tool_names(messages: Sequence[Message]) -> dict[str, str]:
    return {c.id: c.name for m in messages for c in m.tool_calls}


def _dicts(messages: Sequence[Message], object_arguments: bool) -> list[dict[str, Any]]:
    names = _tool_names(messages)
    out = []
    for i, m in enumerate(messages):
        d: dict[str, Any] = {"role": m.role, "content": m.content}
        if m.name or (m.role == "tool" and m.tool_call_id in names):
            d["name"] = m.name or names[m.tool_call_id]
        if m.tool_calls:
            d["tool_calls"] = [
                {
                    "id": c.id,
                    "type": "function",
                    "function": {
                        "name": c.name,
                        "arguments": _arguments(c, f"messages[{i}].tool_calls[{j}]")
                        if object_arguments
                        else c.arguments,
                    },
                }
                for j, c in enumerate(m.tool_calls)
            ]
        if m.tool_call_id:
            d["tool_call_id"] = m.tool_call_id
        out.append(d)
    return out


def _arguments(call: ToolCall, where: str) -> Any:
    try:
        return json.loads(call.arguments or "{}")
    except ValueError as error:
        raise InvalidArgument(
            f"tool call arguments are not JSON: {error}", field=f"{where}.arguments"
        ) from error


def _inline(
    messages: Sequence[Message], tools: Sequence[Mapping[str, Any]]
) -> list[dict[str, Any]]:
    names = _tool_names(messages)
    out: list[dict[str, Any]] = []
    for i, m in enumerate(messages):
        if m.role == "tool":
            name = m.name or names.get(m.tool_call_id, "")
            block = (
                f'<tool_response id="{m.tool_call_id}" name="{name}">\n'
                f"{m.content.strip()}\n</tool_response>"
            )
            if out and out[-1].get("_tool_results"):
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block, "_tool_results": True})
            continue
        content = m.content
        if m.tool_calls:
            blocks = []
            for j, c in enumerate(m.tool_calls):
                # Parsed and dumped again: what the model sees has the separators it is held to.
                args = _tojson(_arguments(c, f"messages[{i}].tool_calls[{j}]"))
                blocks.append(tool_call_block(c.name, args))
            calls = "".join(blocks)
            content = f"{content.strip()}\n{calls}" if content.strip() else calls
        d: dict[str, Any] = {"role": m.role, "content": content}
        if m.name:
            d["name"] = m.name
        out.append(d)
    for d in out:
        d.pop("_tool_results", None)
    if tools:
        preamble = tools_preamble(tools)
        if out and out[0]["role"] == "system":
            out[0]["content"] = out[0]["content"] + "\n\n" + preamble
        else:
            out.insert(0, {"role": "system", "content": preamble})
    return out
