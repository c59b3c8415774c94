"""Chat and completions with tools, output constraints and n: wire models, protobuf, SDK shapes."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx2
import openai
import pytest
from helpers import DEFAULT_MODEL, gateway_settings, mesh_settings, runtime
from openai import AsyncOpenAI
from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from prometheus_client import CollectorRegistry

from gateway.app import build_app
from gateway.protocol import RequestInvalid, parse_chat, parse_completion
from gateway.serving import (
    SSE_DONE,
    ChatFormat,
    CompletionFormat,
    GenerationBuilder,
    chat_request,
    completion_request,
)
from slm.server import GrpcService
from slm.v1 import types_pb2

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather of a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city"],
            "additionalProperties": False,
        },
        "strict": True,
    },
}
TIME = {"type": "function", "function": {"name": "get_time"}}
SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
}


def chat(**fields: Any) -> bytes:
    body: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    body.update(fields)
    return json.dumps(body).encode()


def completion(**fields: Any) -> bytes:
    return json.dumps({"model": "m", "prompt": "p", **fields}).encode()


def refused(body: bytes, parse: Any = parse_chat) -> RequestInvalid:
    with pytest.raises(RequestInvalid) as caught:
        parse(body)
    return caught.value


# --- refusals -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field",
    ["foo", "functions", "function_call", "reasoning_effort", "modalities", "prediction", "audio"],
)
def test_unknown_or_unimplemented_fields_are_named(field: str) -> None:
    error = refused(chat(**{field: None}))
    assert error.param == field
    assert error.message == f"Unrecognized request argument supplied: {field}"


def test_unknown_nested_fields_are_named() -> None:
    error = refused(chat(messages=[{"role": "user", "content": "hi", "audio": {}}]))
    assert error.param == "messages[0].audio"
    error = refused(chat(tools=[{**WEATHER, "function": {"name": "f", "extra": 1}}]))
    assert error.param == "tools[0].function.extra"


def test_completions_refuse_tools_by_name() -> None:
    assert refused(completion(tools=[WEATHER]), parse_completion).param == "tools"
    assert refused(completion(echo=True), parse_completion).param == "echo"


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"tools": [{"type": "custom", "custom": {"name": "x"}}]}, "tools[0].type"),
        ({"tools": [{**WEATHER, "function": {"name": "bad name"}}]}, "tools[0].function.name"),
        ({"tools": [WEATHER, WEATHER]}, "tools"),
        ({"tool_choice": "auto"}, "tool_choice"),
        ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
        ({"tools": [WEATHER], "tool_choice": {"type": "allowed_tools"}}, "tool_choice.type"),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "x"}}},
            "tool_choice",
        ),
        ({"tools": [WEATHER], "tool_choice": {"type": "function"}}, "tool_choice"),
        ({"parallel_tool_calls": False}, "parallel_tool_calls"),
        ({"response_format": {"type": "yaml"}}, "response_format.type"),
        ({"response_format": {"type": "json_schema"}}, "response_format"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
            "response_format.json_schema.schema",
        ),
        (
            {
                "response_format": {"type": "json_object"},
                "guided_regex": "a+",
            },
            "guided_regex",
        ),
        ({"guided_json": "{not json"}, "guided_json"),
        ({"guided_choice": []}, "guided_choice"),
        ({"store": True}, "store"),
        ({"messages": [{"role": "tool", "content": "4"}]}, "messages[0].tool_call_id"),
        (
            {"messages": [{"role": "user", "content": "x", "tool_call_id": "c"}]},
            "messages[0].tool_call_id",
        ),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": "x",
                        "tool_calls": [
                            {
                                "id": "c",
                                "type": "function",
                                "function": {"name": "f", "arguments": ""},
                            }
                        ],
                    }
                ]
            },
            "messages[0].tool_calls",
        ),
        ({"n": 0}, "n"),
        ({"n": 9}, "n"),
    ],
)
def test_invalid_agent_fields_name_their_param(fields: dict[str, Any], param: str) -> None:
    assert refused(chat(**fields)).param == param


def test_n_limit_comes_from_the_configuration() -> None:
    assert parse_chat(chat(n=3), max_n=3).choices == 3
    assert refused(chat(n=3), lambda b: parse_chat(b, max_n=2)).message.endswith(
        "n may be at most 2 on this server."
    )
    assert parse_completion(completion(n=4)).choices == 4


def test_harmless_metadata_is_accepted() -> None:
    parse_chat(chat(user="u1", metadata={"k": "v"}, store=False))


# --- translation to the Doorman's contract ------------------------------------------------------


def test_tools_and_choices_reach_the_proto() -> None:
    request = chat_request(parse_chat(chat(tools=[WEATHER, TIME], parallel_tool_calls=False)))
    spec = request.tools
    assert [t.name for t in spec.tools] == ["get_weather", "get_time"]
    weather, clock = spec.tools
    assert weather.description == "Weather of a city"
    assert json.loads(weather.parameters) == WEATHER["function"]["parameters"]  # type: ignore[index]
    # The schema text keeps the caller's property order.
    assert weather.parameters.index('"city"') < weather.parameters.index('"days"')
    assert weather.strict
    assert (clock.parameters, clock.strict) == ("", False)
    assert spec.choice.mode == types_pb2.TOOL_CHOICE_MODE_AUTO
    assert spec.HasField("parallel_tool_calls")
    assert not spec.parallel_tool_calls


@pytest.mark.parametrize(
    ("choice", "mode", "name"),
    [
        ("none", types_pb2.TOOL_CHOICE_MODE_NONE, ""),
        ("auto", types_pb2.TOOL_CHOICE_MODE_AUTO, ""),
        ("required", types_pb2.TOOL_CHOICE_MODE_REQUIRED, ""),
        (
            {"type": "function", "function": {"name": "get_time"}},
            types_pb2.TOOL_CHOICE_MODE_FUNCTION,
            "get_time",
        ),
    ],
)
def test_each_tool_choice_form(
    choice: Any, mode: types_pb2.ToolChoiceMode.ValueType, name: str
) -> None:
    spec = chat_request(parse_chat(chat(tools=[WEATHER, TIME], tool_choice=choice))).tools
    assert (spec.choice.mode, spec.choice.function_name) == (mode, name)
    assert not spec.HasField("parallel_tool_calls")


def test_no_tools_means_no_tool_spec() -> None:
    assert not chat_request(parse_chat(chat(tools=[]))).HasField("tools")


def constraint_of(body: bytes) -> types_pb2.OutputConstraint | None:
    sampling = chat_request(parse_chat(body)).sampling
    return sampling.constraint if sampling.HasField("constraint") else None


def test_response_formats() -> None:
    assert constraint_of(chat(response_format={"type": "text"})) is None
    obj = constraint_of(chat(response_format={"type": "json_object"}))
    assert obj is not None
    assert obj.WhichOneof("kind") == "json_object"
    fmt = {
        "type": "json_schema",
        "json_schema": {"name": "person", "schema": SCHEMA, "strict": True},
    }
    schema = constraint_of(chat(response_format=fmt))
    assert schema is not None
    assert schema.WhichOneof("kind") == "json_schema"
    assert schema.json_schema.name == "person"
    assert json.loads(schema.json_schema.schema) == SCHEMA
    assert schema.json_schema.strict


def test_vllm_guided_extensions() -> None:
    as_text = constraint_of(chat(guided_json=json.dumps(SCHEMA)))
    assert as_text is not None
    assert json.loads(as_text.json_schema.schema) == SCHEMA
    regex = constraint_of(chat(guided_regex="[0-9]+"))
    assert regex is not None
    assert regex.regex == "[0-9]+"
    choice = constraint_of(chat(guided_choice=["yes", "no"]))
    assert choice is not None
    assert list(choice.choice.choices) == ["yes", "no"]
    grammar = constraint_of(chat(guided_grammar='root ::= "a"'))
    assert grammar is not None
    assert grammar.grammar.syntax == types_pb2.GRAMMAR_SYNTAX_GBNF
    assert grammar.grammar.source == 'root ::= "a"'


def test_completion_constraint_and_n() -> None:
    sampling = completion_request(
        parse_completion(completion(n=2, response_format={"type": "json_object"}))
    ).sampling
    assert sampling.n == 2
    assert sampling.constraint.WhichOneof("kind") == "json_object"
    assert not completion_request(parse_completion(completion())).sampling.HasField("n")


# --- responses, checked against the openai SDK's own types --------------------------------------


def delta(
    text: str = "",
    index: int = 0,
    calls: tuple[types_pb2.ToolCallDelta, ...] = (),
    reasoning: str = "",
) -> types_pb2.TextDelta:
    return types_pb2.TextDelta(text=text, choice_index=index, tool_calls=calls, reasoning=reasoning)


def call_piece(index: int, arguments: str, id: str = "", name: str = "") -> types_pb2.ToolCallDelta:
    return types_pb2.ToolCallDelta(index=index, id=id, name=name, arguments=arguments)


TOOL_EVENTS = [
    delta(reasoning="thinking"),
    delta(calls=(call_piece(0, '{"ci', id="call_a", name="get_weather"),)),
    delta(calls=(call_piece(0, 'ty":"Paris"}'),)),
    delta(calls=(call_piece(1, "", id="call_b", name="get_time"), call_piece(1, "{}"))),
]
TOOL_END = types_pb2.StreamEnd(
    finish_reason=types_pb2.FINISH_REASON_TOOL_CALLS,
    usage=types_pb2.Usage(prompt_tokens=5, completion_tokens=9),
    model="m",
)


def test_whole_tool_call_response_parses_as_a_chat_completion() -> None:
    builder = GenerationBuilder()
    for event in TOOL_EVENTS:
        builder.add(event)
    body = ChatFormat("r", "m", include_usage=False).whole(builder.build(TOOL_END))
    parsed = ChatCompletion.model_validate(body)
    (choice,) = parsed.choices
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    calls = choice.message.tool_calls or []
    assert [(c.id, c.type, c.function.name, c.function.arguments) for c in calls] == [  # type: ignore[union-attr]
        ("call_a", "function", "get_weather", '{"city":"Paris"}'),
        ("call_b", "function", "get_time", "{}"),
    ]
    assert body["choices"][0]["message"]["reasoning_content"] == "thinking"


def stream_frames(
    fmt: ChatFormat, events: list[types_pb2.TextDelta], end: types_pb2.StreamEnd
) -> list[bytes]:
    frames = list(fmt.opening())
    for event in events:
        frames.extend(fmt.delta(event))
    frames.extend(fmt.closing(end))
    return frames


def chunks_of(frames: list[bytes]) -> list[dict[str, Any]]:
    assert frames[-1] == SSE_DONE
    return [json.loads(f.removeprefix(b"data: ").removesuffix(b"\n\n")) for f in frames[:-1]]


def test_streamed_tool_calls_assemble_with_the_sdk() -> None:
    fmt = ChatFormat("r", "m", include_usage=True)
    chunks = chunks_of(stream_frames(fmt, TOOL_EVENTS, TOOL_END))
    state: ChatCompletionStreamState[None] = ChatCompletionStreamState()
    for chunk in chunks:
        state.handle_chunk(ChatCompletionChunk.model_validate(chunk))
    final = state.get_final_completion()
    (choice,) = final.choices
    assert choice.finish_reason == "tool_calls"
    calls = choice.message.tool_calls or []
    assert [(c.id, c.function.name, c.function.arguments) for c in calls] == [
        ("call_a", "get_weather", '{"city":"Paris"}'),
        ("call_b", "get_time", "{}"),
    ]
    assert final.usage is not None
    assert final.usage.total_tokens == 14
    pieces = [c["choices"][0]["delta"].get("tool_calls") for c in chunks if c["choices"]]
    firsts = [p for piece in pieces if piece for p in piece if "id" in p]
    # id, type and name travel only in each call's first piece.
    assert [(p["id"], p["type"], p["function"]["name"]) for p in firsts] == [
        ("call_a", "function", "get_weather"),
        ("call_b", "function", "get_time"),
    ]
    later = [p for piece in pieces if piece for p in piece if "id" not in p]
    assert all(
        set(p) == {"index", "function"} and set(p["function"]) == {"arguments"} for p in later
    )
    reasoning = [c["choices"][0]["delta"].get("reasoning_content") for c in chunks if c["choices"]]
    assert "thinking" in reasoning


def test_n_choices_stream_interleaved_with_one_finish_each() -> None:
    end = types_pb2.StreamEnd(
        finish_reason=types_pb2.FINISH_REASON_STOP,
        usage=types_pb2.Usage(prompt_tokens=2, completion_tokens=5),
        choices=[
            types_pb2.ChoiceEnd(index=1, finish_reason=types_pb2.FINISH_REASON_LENGTH),
            types_pb2.ChoiceEnd(index=0, finish_reason=types_pb2.FINISH_REASON_STOP),
        ],
    )
    events = [delta("a", 0), delta("x", 1), delta("b", 0), delta("y", 1)]
    fmt = ChatFormat("r", "m", include_usage=False, n=2)
    chunks = chunks_of(stream_frames(fmt, events, end))
    state: ChatCompletionStreamState[None] = ChatCompletionStreamState()
    for chunk in chunks:
        ChatCompletionChunk.model_validate(chunk)
        state.handle_chunk(ChatCompletionChunk.model_validate(chunk))
    # get_final_completion refuses a "length" choice; the snapshot is the same assembly.
    final = state.current_completion_snapshot
    assert [(c.index, c.message.content, c.finish_reason) for c in final.choices] == [
        (0, "ab", "stop"),
        (1, "xy", "length"),
    ]
    finishes = [
        (choice["index"], choice["finish_reason"])
        for chunk in chunks
        for choice in chunk["choices"]
        if choice["finish_reason"] is not None
    ]
    assert sorted(finishes) == [(0, "stop"), (1, "length")]
    assert [c["choices"][0]["index"] for c in chunks[2:6]] == [0, 1, 0, 1]

    builder = GenerationBuilder()
    for event in events:
        builder.add(event)
    whole = ChatCompletion.model_validate(fmt.whole(builder.build(end)))
    assert [(c.index, c.message.content, c.finish_reason) for c in whole.choices] == [
        (0, "ab", "stop"),
        (1, "xy", "length"),
    ]


def test_completion_choices_parse_as_a_completion() -> None:
    end = types_pb2.StreamEnd(
        usage=types_pb2.Usage(prompt_tokens=1, completion_tokens=2),
        choices=[
            types_pb2.ChoiceEnd(index=0, finish_reason=types_pb2.FINISH_REASON_STOP),
            types_pb2.ChoiceEnd(index=1, finish_reason=types_pb2.FINISH_REASON_STOP),
        ],
    )
    fmt = CompletionFormat("r", "m", include_usage=False, n=2)
    builder = GenerationBuilder()
    builder.add(delta("{}", 1))
    builder.add(delta("[]", 0))
    parsed = Completion.model_validate(fmt.whole(builder.build(end)))
    assert [(c.index, c.text) for c in parsed.choices] == [(0, "[]"), (1, "{}")]
    frames = fmt.delta(delta("z", 1)) + fmt.closing(end)
    first, *finishes = chunks_of(frames)
    # The SDK reads stream chunks without validation (finish_reason is null mid-stream).
    assert first["choices"] == [{"index": 1, "text": "z", "logprobs": None, "finish_reason": None}]
    streamed = [Completion.model_validate(c) for c in finishes]
    assert [(c.choices[0].index, c.choices[0].finish_reason) for c in streamed] == [
        (0, "stop"),
        (1, "stop"),
    ]


# --- through the real Doorman and engine, with the official openai client -----------------------


@contextlib.asynccontextmanager
async def gateway_over_mesh(
    inference: GrpcService, ledger: GrpcService, state_dir: Path
) -> AsyncIterator[httpx2.AsyncClient]:
    """The gateway app over a real Doorman (port 0) over the real engine, and an HTTP client on
    it of the kind the official openai and anthropic SDKs take (httpx2).

    The other families' tests (Responses, Messages) use it too.
    """
    from doorman.app import build_app as build_doorman

    settings = mesh_settings(state_dir)
    settings.doorman = settings.doorman.model_copy(
        update={
            "inference_local": f"127.0.0.1:{inference.port}",
            "ledger": f"127.0.0.1:{ledger.port}",
        }
    )
    registry = CollectorRegistry()
    endpoint = settings.doorman.endpoint.model_copy(update={"port": 0, "metrics_port": 0})
    async with GrpcService(
        "doorman",
        build_doorman(settings.doorman, runtime(settings, registry)),
        endpoint,
        settings.telemetry,
        registry,
    ) as doorman:
        settings.gateway = settings.gateway.model_copy(
            update={"doorman": f"127.0.0.1:{doorman.port}"}
        )
        app = build_app(gateway_settings(settings))
        async with app.router.lifespan_context(app):
            transport = httpx2.ASGITransport(app=app)
            async with httpx2.AsyncClient(
                transport=transport, base_url="http://gateway", timeout=120
            ) as client:
                yield client


@pytest.fixture
async def openai_client(
    inference_server: GrpcService, ledger_server: GrpcService, tmp_path: Path
) -> AsyncIterator[AsyncOpenAI]:
    async with gateway_over_mesh(inference_server, ledger_server, tmp_path) as http:
        yield AsyncOpenAI(base_url="http://gateway/v1", api_key="unused", http_client=http)


def assert_person(value: Any) -> None:
    """SCHEMA, checked by hand: an object with a string name and an integer age."""
    assert isinstance(value, dict)
    assert isinstance(value["name"], str)
    assert isinstance(value["age"], int)
    assert not isinstance(value["age"], bool)


MESSAGES: list[Any] = [{"role": "user", "content": "What is the weather in Paris?"}]
# One short string argument, so that the small model's call ends well within max_tokens.
CITY: Any = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 20}},
            "required": ["city"],
            "additionalProperties": False,
        },
        "strict": True,
    },
}


async def test_forced_tool_call_parses_and_validates(openai_client: AsyncOpenAI) -> None:
    completion = await openai_client.chat.completions.create(
        model=DEFAULT_MODEL,
        messages=MESSAGES,
        tools=[CITY],
        tool_choice="required",
        max_tokens=64,
        temperature=0,
    )
    (choice,) = completion.choices
    assert choice.finish_reason == "tool_calls", choice.message
    assert choice.message.content is None
    (call, *_) = choice.message.tool_calls or []
    assert call.type == "function"
    assert call.function.name == "get_weather"
    arguments = json.loads(call.function.arguments)
    assert set(arguments) == {"city"}
    assert isinstance(arguments["city"], str)


async def test_streamed_tool_call_assembles_with_the_stream_helper(
    openai_client: AsyncOpenAI,
) -> None:
    async with openai_client.chat.completions.stream(
        model=DEFAULT_MODEL,
        messages=MESSAGES,
        tools=[CITY],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=64,
        temperature=0,
    ) as stream:
        final = await stream.get_final_completion()
    (choice,) = final.choices
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls or []
    assert call.function.name == "get_weather"
    json.loads(call.function.arguments)


async def test_json_schema_output_validates(openai_client: AsyncOpenAI) -> None:
    # Bounded, so that a sampled answer must close well within max_tokens.
    bounded = {
        **SCHEMA,
        "properties": {
            "name": {"type": "string", "maxLength": 24},
            "age": {"type": "integer", "minimum": 0, "maximum": 150},
        },
        "additionalProperties": False,
    }
    person: Any = {
        "type": "json_schema",
        "json_schema": {"name": "person", "schema": bounded, "strict": True},
    }
    completion = await openai_client.chat.completions.create(
        model=DEFAULT_MODEL,
        messages=[{"role": "user", "content": "Describe a person as JSON."}],
        response_format=person,
        max_tokens=128,
        temperature=0.8,
        seed=1,
    )
    (choice,) = completion.choices
    assert choice.finish_reason == "stop"
    value = json.loads(choice.message.content or "")
    assert_person(value)
    assert set(value) == {"name", "age"}
    assert len(value["name"]) <= 24
    assert 0 <= value["age"] <= 150


async def test_n_choices_stream_with_their_index(openai_client: AsyncOpenAI) -> None:
    stream = await openai_client.chat.completions.create(
        model=DEFAULT_MODEL,
        messages=MESSAGES,
        n=3,
        max_tokens=8,
        temperature=0.8,
        stream=True,
    )
    finishes: dict[int, list[str]] = {}
    async for chunk in stream:
        for choice in chunk.choices:
            if choice.finish_reason is not None:
                finishes.setdefault(choice.index, []).append(choice.finish_reason)
    assert sorted(finishes) == [0, 1, 2]
    assert all(len(reasons) == 1 for reasons in finishes.values())


async def test_unknown_field_is_refused_through_the_client(openai_client: AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        await openai_client.chat.completions.create(
            model=DEFAULT_MODEL,
            messages=MESSAGES,
            extra_body={"guided_decoding_backend": "outlines"},
        )
    assert caught.value.body["param"] == "guided_decoding_backend"  # type: ignore[index]


async def test_the_sdk_sends_its_own_message_back(openai_client: AsyncOpenAI) -> None:
    # Chat loops append the returned message to the history as the SDK parsed it.
    history: list[Any] = list(MESSAGES)
    first = await openai_client.chat.completions.create(
        model=DEFAULT_MODEL, messages=history, tools=[CITY], tool_choice="required", max_tokens=64
    )
    message = first.choices[0].message
    (call, *_) = message.tool_calls or []
    history += [message, {"role": "tool", "tool_call_id": call.id, "content": "Sunny."}]
    second = await openai_client.chat.completions.create(
        model=DEFAULT_MODEL, messages=history, tools=[CITY], tool_choice="none", max_tokens=8
    )
    assert second.choices[0].message.tool_calls is None
    assert second.usage is not None
    assert first.usage is not None
    assert second.usage.prompt_tokens > first.usage.prompt_tokens


def test_reasoning_sent_back_is_accepted_on_assistant_turns_only() -> None:
    back = {"role": "assistant", "content": "4", "reasoning_content": "2+2"}
    parse_chat(chat(messages=[{"role": "user", "content": "2+2?"}, back]))
    wrong = {"role": "user", "content": "x", "reasoning_content": "y"}
    assert refused(chat(messages=[wrong])).param == "messages[0].reasoning_content"
