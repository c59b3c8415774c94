"""Chat templates with tools, and the tool-call constraint and parser, at the core level."""

from __future__ import annotations

import json
import random

import llguidance
import pytest

from inference_local.chat_template import ChatTemplate, Message, tools_preamble
from inference_local.config import GEMMA_CHAT_TEMPLATE
from inference_local.constraints import Constraint
from inference_local.tools import (
    ChoiceMode,
    Tool,
    ToolCall,
    ToolCallDelta,
    ToolCallParser,
    ToolChoice,
    ToolSpec,
    constraint,
    openai_tools,
    schemas,
)
from slm.errors import InvalidArgument

WEATHER = Tool(
    "get_weather",
    "The weather in a city <now> & later",
    json.dumps(
        {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
            "additionalProperties": False,
        }
    ),
)
TIME = Tool("get_time")
SPEC = ToolSpec((WEATHER, TIME))

HISTORY = (
    Message("system", "Be brief."),
    Message("user", "Weather in Paris and Nice?"),
    Message(
        "assistant",
        "",
        tool_calls=(
            ToolCall("call_1", "get_weather", '{"city":"Paris"}'),
            ToolCall("call_2", "get_weather", '{"city": "Nice"}'),
        ),
    ),
    Message("tool", "18C", tool_call_id="call_1"),
    Message("tool", "20C", tool_call_id="call_2"),
)

# The template before tools: what every template that ignores tools looks like.
PLAIN_GEMMA = (
    "{{ bos_token }}"
    "{% set ns = namespace(system='', first=true) %}"
    "{% for m in messages %}{% if m.role == 'system' %}"
    "{% set ns.system = ns.system + m.content + '\\n\\n' %}"
    "{% endif %}{% endfor %}"
    "{% for m in messages %}{% if m.role != 'system' %}"
    "<start_of_turn>{{ 'model' if m.role == 'assistant' else 'user' }}\n"
    "{% if ns.first and m.role != 'assistant' %}{{ ns.system }}{% endif %}"
    "{% set ns.first = false %}"
    "{{ m.content | trim }}<end_of_turn>\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)

# A small Hermes-style template of the kind a GGUF carries (Qwen's is longer, same shape): it
# prints arguments with tojson, so it wants them as an object.
HERMES = (
    "{% if tools %}<|im_start|>system\n<tools>\n{% for t in tools %}{{ t | tojson }}\n"
    "{% endfor %}</tools><|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
    "{% for c in m.tool_calls or [] %}<tool_call>\n"
    '{"name": "{{ c.function.name }}", "arguments": {{ c.function.arguments | tojson }}}\n'
    "</tool_call>{% endfor %}"
    "{% if m.role == 'tool' %} ({{ m.tool_call_id }}){% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# A template that prints the arguments as they come: it wants JSON text.
HERMES_TEXT_ARGS = HERMES.replace(
    "{{ c.function.arguments | tojson }}", "{{ c.function.arguments }}"
)


def gemma() -> ChatTemplate:
    return ChatTemplate(GEMMA_CHAT_TEMPLATE, "<bos>", "<eos>")


def tools_json() -> list[dict[str, object]]:
    return openai_tools(SPEC, schemas(SPEC))


def test_plain_chat_renders_as_before_tools() -> None:
    messages = (
        Message("system", "S"),
        Message("user", "hi"),
        Message("assistant", "yo"),
        Message("user", "x"),
    )
    plain = ChatTemplate(PLAIN_GEMMA, "<bos>", "<eos>")
    assert gemma().render(messages) == plain.render(messages)
    assert gemma().render(messages) == (
        "<bos><start_of_turn>user\nS\n\nhi<end_of_turn>\n<start_of_turn>model\nyo<end_of_turn>\n"
        "<start_of_turn>user\nx<end_of_turn>\n<start_of_turn>model\n"
    )


def test_gemma_template_renders_tools_calls_and_results() -> None:
    template = gemma()
    assert template.native_tools
    text = template.render(HISTORY, tools_json())
    assert text.startswith("<bos><start_of_turn>user\nBe brief.\n\n# Tools\n")
    # The descriptions reach the model as written, not HTML-escaped.
    assert '"description": "The weather in a city <now> & later"' in text
    assert tools_preamble(tools_json()) in text
    assert text.endswith(
        "Weather in Paris and Nice?<end_of_turn>\n"
        "<start_of_turn>model\n"
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Nice"}}\n</tool_call>'
        "<end_of_turn>\n"
        "<start_of_turn>user\n"
        '<tool_response id="call_1" name="get_weather">\n18C\n</tool_response>\n'
        '<tool_response id="call_2" name="get_weather">\n20C\n</tool_response><end_of_turn>\n'
        "<start_of_turn>model\n"
    )


def test_template_that_ignores_tools_gets_them_inline_in_the_same_format() -> None:
    plain = ChatTemplate(PLAIN_GEMMA, "<bos>", "<eos>")
    assert not plain.native_tools
    assert plain.render(HISTORY, tools_json()) == gemma().render(HISTORY, tools_json())
    # Without a system message the preamble becomes one.
    text = plain.render((Message("user", "hi"),), tools_json())
    assert text.startswith("<bos><start_of_turn>user\n# Tools\n")
    assert text.endswith("</tool_call>\n\nhi<end_of_turn>\n<start_of_turn>model\n")


def test_gguf_template_that_renders_tools_is_used_natively() -> None:
    template = ChatTemplate(HERMES, "", "")
    assert template.native_tools
    text = template.render(HISTORY, tools_json())
    assert text.startswith('<|im_start|>system\n<tools>\n{"type": "function", "function": ')
    assert (
        '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": '
        '{"city": "Paris"}}\n</tool_call>'
    ) in text
    assert "<|im_start|>tool\n18C (call_1)<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")
    # The template's own format, not the inline one.
    assert "# Tools" not in text


def test_gguf_template_printing_arguments_as_is_gets_json_text() -> None:
    template = ChatTemplate(HERMES_TEXT_ARGS, "", "")
    assert template.native_tools
    text = template.render(HISTORY, tools_json())
    # The caller's own text, untouched.
    assert '"arguments": {"city":"Paris"}' in text


def test_bad_arguments_in_history_name_the_field() -> None:
    history = (
        Message("user", "hi"),
        Message("assistant", "", tool_calls=(ToolCall("call_1", "get_time", "{not json"),)),
    )
    with pytest.raises(InvalidArgument) as caught:
        gemma().render(history, tools_json())
    assert caught.value.field == "messages[1].tool_calls[0].arguments"


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        (ToolSpec(()), "tools.tools"),
        (ToolSpec((Tool("bad name"),)), "tools.tools[0].name"),
        (ToolSpec((Tool("a" * 65),)), "tools.tools[0].name"),
        (ToolSpec((TIME, Tool("get_time"))), "tools.tools[1].name"),
        (ToolSpec((TIME, Tool("x", parameters="{oops"))), "tools.tools[1].parameters"),
        (ToolSpec((Tool("x", parameters="[1]"),)), "tools.tools[0].parameters"),
        (ToolSpec((Tool("x", parameters='{"type": "string"}'),)), "tools.tools[0].parameters"),
        (
            ToolSpec((TIME, Tool("x", parameters='{"properties": {"a": {"uniqueItems": true}}}'))),
            "tools.tools[1].parameters",
        ),
        (
            ToolSpec((TIME,), ToolChoice(ChoiceMode.FUNCTION, "nope")),
            "tools.choice.function_name",
        ),
        (ToolSpec((TIME,), ToolChoice(ChoiceMode.AUTO, "get_time")), "tools.choice.function_name"),
    ],
)
def test_invalid_tools_name_the_field(spec: ToolSpec, field: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        schemas(spec)
    assert caught.value.field == field


def compiles(c: Constraint) -> bool:
    grammar = llguidance.grammar_from("lark", c.lark)
    error: str = llguidance.LLMatcher.validate_grammar(grammar)
    assert not error, error
    return True


@pytest.mark.parametrize("parallel", [True, False])
@pytest.mark.parametrize("mode", list(ChoiceMode))
def test_each_tool_choice_gives_a_grammar_that_compiles(mode: ChoiceMode, parallel: bool) -> None:
    name = "get_weather" if mode is ChoiceMode.FUNCTION else ""
    spec = ToolSpec(SPEC.tools, ToolChoice(mode, name), parallel)
    c = constraint(spec, schemas(spec), None)
    if mode is ChoiceMode.NONE:
        assert c is None
        return
    assert c is not None
    assert compiles(c)
    assert (c.trigger == "<tool_call>") == (mode is ChoiceMode.AUTO)
    assert ("(tool_call)*" in c.lark) == (parallel and mode is not ChoiceMode.FUNCTION)
    if mode is ChoiceMode.FUNCTION:
        assert '\\"get_time\\"' not in c.lark


def test_auto_with_an_output_constraint_offers_calls_or_the_response() -> None:
    response = Constraint('start: %json {"type": "object"}', "json_object")
    c = constraint(SPEC, schemas(SPEC), response)
    assert c is not None
    assert c.trigger is None
    assert compiles(c)
    assert c.lark.startswith("start: tool_calls | response_text\n")
    # required and function admit no text answer for the response constraint to shape.
    required = ToolSpec(SPEC.tools, ToolChoice(ChoiceMode.REQUIRED))
    forced = constraint(required, schemas(required), response)
    assert forced is not None
    assert "response_text" not in forced.lark
    # none leaves the response constraint alone.
    none = ToolSpec(SPEC.tools, ToolChoice(ChoiceMode.NONE))
    assert constraint(none, schemas(none), response) is response


CALLS_TEXT = (
    "Let me look.\n"
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Pa\\"ris}", '
    '"n": [1, {"a": "}"}]}}\n</tool_call>\n'
    '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>\n'
)


def feed_all(parser: ToolCallParser, pieces: list[str]) -> tuple[str, list[ToolCallDelta]]:
    content, deltas = [], []
    for piece in pieces:
        text, calls = parser.feed(piece)
        content.append(text)
        deltas += calls
    text, calls = parser.finish()
    return "".join(content) + text, deltas + calls


@pytest.mark.parametrize("seed", range(20))
def test_parser_streams_calls_whatever_the_split(seed: int) -> None:
    rng = random.Random(seed)
    pieces, at = [], 0
    while at < len(CALLS_TEXT):
        size = rng.randint(1, 6)
        pieces.append(CALLS_TEXT[at : at + size])
        at += size
    parser = ToolCallParser({"get_weather", "get_time"})
    content, deltas = feed_all(parser, pieces)
    assert content == "Let me look.\n"
    firsts = [d for d in deltas if d.id]
    assert [(d.index, d.name) for d in firsts] == [(0, "get_weather"), (1, "get_time")]
    assert all(d.id.startswith("call_") and len(d.id) == 29 for d in firsts)
    arguments: dict[int, str] = {}
    for d in deltas:
        arguments[d.index] = arguments.get(d.index, "") + d.arguments
    assert arguments == {0: '{"city": "Pa\\"ris}", "n": [1, {"a": "}"}]}', 1: "{}"}
    assert [(c.name, c.arguments) for c in parser.calls] == [
        ("get_weather", arguments[0]),
        ("get_time", "{}"),
    ]
    assert parser.called


def test_parser_streams_arguments_before_the_call_is_complete() -> None:
    parser = ToolCallParser({"get_weather"})
    text, deltas = parser.feed('<tool_call>\n{"name": "get_weather", "arguments": {"ci')
    assert text == ""
    assert [(d.name, d.arguments) for d in deltas] == [("get_weather", ""), ("", '{"ci')]


def test_parser_passes_on_text_that_is_no_call() -> None:
    parser = ToolCallParser({"get_time"})
    assert parser.feed("a <tool") == ("a ", [])
    assert parser.feed("_call>\nnot a call") == ("<tool_call>\nnot a call", [])
    assert parser.finish() == ("", [])
    assert not parser.called
    # An unknown tool name is text too, as is a held-back start of the opener at the end.
    other = ToolCallParser({"get_time"})
    content, deltas = feed_all(other, ['<tool_call>\n{"name": "rm", "arguments": {}}', " <to"])
    assert (content, deltas) == ('<tool_call>\n{"name": "rm", "arguments": {}} <to', [])


def test_parser_takes_calls_back_to_back_and_drops_one_cut_short() -> None:
    parser = ToolCallParser({"get_time"})
    call = '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'
    content, deltas = feed_all(parser, [call + call + '<tool_call>\n{"name": "get_t'])
    assert content == ""
    assert [(d.index, d.name, d.arguments) for d in deltas] == [
        (0, "get_time", ""),
        (0, "", "{}"),
        (1, "get_time", ""),
        (1, "", "{}"),
    ]
    assert len(parser.calls) == 2
