"""Tool calling, CountTokens and `n` through a real inference-local gRPC server on the real
default model. A 270M base model proves the format, not the wisdom of its choices."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import jsonschema
import pytest
from helpers import DEFAULT_MODEL, SHARED_MODELS_DIR
from prometheus_client import CollectorRegistry
from test_chat_template import HERMES

from inference_local.chat_template import ChatTemplate, Message
from inference_local.config import GEMMA_CHAT_TEMPLATE, InferenceLocalConfig, ModelConfig
from inference_local.engine import Delta, End, Engine, Finish, Request
from inference_local.sampling import Sampling
from inference_local.tools import (
    ChoiceMode,
    Tool,
    ToolCall,
    ToolChoice,
    ToolSpec,
    openai_tools,
    schemas,
)
from slm.errors import InvalidArgument, from_rpc_error
from slm.server import GrpcService
from slm.v1 import inference_pb2, inference_pb2_grpc, types_pb2

WEATHER_SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 24},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
WEATHER = types_pb2.Tool(
    name="get_weather",
    description="The current weather in a city.",
    parameters=json.dumps(WEATHER_SCHEMA),
    strict=True,
)
TIME_SCHEMA = {
    "type": "object",
    "properties": {"timezone": {"type": "string", "maxLength": 24}},
    "required": ["timezone"],
    "additionalProperties": False,
}
TIME = types_pb2.Tool(
    name="get_time",
    description="The current time in a timezone.",
    parameters=json.dumps(TIME_SCHEMA),
)
SCHEMAS = {"get_weather": WEATHER_SCHEMA, "get_time": TIME_SCHEMA}

REQUIRED = types_pb2.ToolChoice(mode=types_pb2.TOOL_CHOICE_MODE_REQUIRED)


def user(text: str) -> types_pb2.ChatMessage:
    return types_pb2.ChatMessage(role=types_pb2.ROLE_USER, content=text)


def assistant_calls(*calls: tuple[str, str, dict[str, str]]) -> types_pb2.ChatMessage:
    return types_pb2.ChatMessage(
        role=types_pb2.ROLE_ASSISTANT,
        tool_calls=[types_pb2.ToolCall(id=i, name=n, arguments=json.dumps(a)) for i, n, a in calls],
    )


def result(call_id: str, text: str) -> types_pb2.ChatMessage:
    return types_pb2.ChatMessage(role=types_pb2.ROLE_TOOL, tool_call_id=call_id, content=text)


def chat(
    messages: list[types_pb2.ChatMessage],
    choice: types_pb2.ToolChoice | None = None,
    parallel: bool | None = None,
    tools: tuple[types_pb2.Tool, ...] = (WEATHER, TIME),
    **sampling: object,
) -> inference_pb2.GenerateRequest:
    spec = types_pb2.ToolSpec(tools=tools, choice=choice)
    if parallel is not None:
        spec.parallel_tool_calls = parallel
    params = {"max_tokens": 96, "temperature": 0.0, **sampling}
    return inference_pb2.GenerateRequest(
        model=DEFAULT_MODEL,
        chat=types_pb2.ChatInput(messages=messages),
        sampling=types_pb2.SamplingParams(**params),  # type: ignore[arg-type]
        tools=spec,
    )


@dataclass
class Choice:
    content: str = ""
    # index -> [id, name, arguments]
    calls: dict[int, list[str]] = field(default_factory=dict)
    pieces: int = 0


@dataclass
class Outcome:
    choices: dict[int, Choice]
    end: types_pb2.StreamEnd


async def run(
    stub: inference_pb2_grpc.InferenceServiceStub, request: inference_pb2.GenerateRequest
) -> Outcome:
    choices: dict[int, Choice] = {}
    end = None
    async for response in stub.Generate(request):
        assert end is None, "nothing may follow the end"
        if response.WhichOneof("event") == "end":
            end = response.end
            continue
        delta = response.delta
        choice = choices.setdefault(delta.choice_index, Choice())
        choice.content += delta.text
        for piece in delta.tool_calls:
            choice.pieces += 1
            if piece.index not in choice.calls:
                # The first piece of a call names it.
                assert piece.id.startswith("call_")
                assert piece.name
                choice.calls[piece.index] = [piece.id, piece.name, ""]
            else:
                assert (piece.id, piece.name) == ("", "")
            choice.calls[piece.index][2] += piece.arguments
    assert end is not None
    return Outcome(choices, end)


def assert_valid_calls(choice: Choice) -> list[tuple[str, dict[str, object]]]:
    assert sorted(choice.calls) == list(range(len(choice.calls)))
    parsed = []
    for _, name, arguments in choice.calls.values():
        value = json.loads(arguments)
        jsonschema.validate(value, SCHEMAS[name])
        parsed.append((name, value))
    return parsed


@pytest.fixture
async def stub(
    inference_server: GrpcService,
) -> AsyncIterator[inference_pb2_grpc.InferenceServiceStub]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{inference_server.port}") as channel:
        yield inference_pb2_grpc.InferenceServiceStub(channel)


async def test_required_call_streams_arguments_that_validate(
    stub: inference_pb2_grpc.InferenceServiceStub,
) -> None:
    request = chat([user("What is the weather in Paris?")], REQUIRED, parallel=False)
    outcome = await run(stub, request)
    assert outcome.end.finish_reason == types_pb2.FINISH_REASON_TOOL_CALLS
    choice = outcome.choices[0]
    assert choice.content == ""
    calls = assert_valid_calls(choice)
    assert len(calls) == 1
    # Streamed: the arguments came in more pieces than the one naming the call.
    assert choice.pieces > 2
    assert outcome.end.usage.completion_tokens > 0


async def test_named_function_is_the_one_called(
    stub: inference_pb2_grpc.InferenceServiceStub,
) -> None:
    choice = types_pb2.ToolChoice(
        mode=types_pb2.TOOL_CHOICE_MODE_FUNCTION, function_name="get_time"
    )
    outcome = await run(stub, chat([user("What is the weather in Paris?")], choice))
    assert outcome.end.finish_reason == types_pb2.FINISH_REASON_TOOL_CALLS
    calls = assert_valid_calls(outcome.choices[0])
    assert [name for name, _ in calls] == ["get_time"]


FEW_SHOT = [
    user("What is the weather in Rome and in Oslo?"),
    assistant_calls(
        ("call_a", "get_weather", {"city": "Rome", "unit": "celsius"}),
        ("call_b", "get_weather", {"city": "Oslo", "unit": "celsius"}),
    ),
    result("call_a", "21 C, sunny"),
    result("call_b", "3 C, snow"),
    types_pb2.ChatMessage(role=types_pb2.ROLE_ASSISTANT, content="Rome: 21 C. Oslo: 3 C."),
    user("What is the weather in Paris and in Nice?"),
]


async def test_parallel_calls_when_allowed_and_one_when_not(
    stub: inference_pb2_grpc.InferenceServiceStub,
) -> None:
    parallel = await run(stub, chat(FEW_SHOT, REQUIRED, parallel=True, max_tokens=160))
    assert parallel.end.finish_reason == types_pb2.FINISH_REASON_TOOL_CALLS
    assert len(assert_valid_calls(parallel.choices[0])) >= 2
    single = await run(stub, chat(FEW_SHOT, REQUIRED, parallel=False, max_tokens=160))
    assert single.end.finish_reason == types_pb2.FINISH_REASON_TOOL_CALLS
    assert len(assert_valid_calls(single.choices[0])) == 1


async def test_auto_lets_the_model_start_a_call_that_is_then_constrained(
    stub: inference_pb2_grpc.InferenceServiceStub,
) -> None:
    auto = types_pb2.ToolChoice(mode=types_pb2.TOOL_CHOICE_MODE_AUTO)
    outcome = await run(stub, chat(FEW_SHOT, auto, max_tokens=160))
    assert outcome.end.finish_reason == types_pb2.FINISH_REASON_TOOL_CALLS
    assert assert_valid_calls(outcome.choices[0])
    assert "<tool_call>" not in outcome.choices[0].content


async def test_auto_without_a_reason_to_call_answers_in_text(
    stub: inference_pb2_grpc.InferenceServiceStub,
) -> None:
    auto = types_pb2.ToolChoice(mode=types_pb2.TOOL_CHOICE_MODE_AUTO)
    outcome = await run(stub, chat([user("Say hello.")], auto, max_tokens=16))
    assert outcome.end.finish_reason in (
        types_pb2.FINISH_REASON_STOP,
        types_pb2.FINISH_REASON_LENGTH,
    )
    assert outcome.choices[0].calls == {}
    assert outcome.choices[0].content


async def test_tool_choice_none_shows_tools_but_never_calls(
    stub: inference_pb2_grpc.InferenceServiceStub,
) -> None:
    none = types_pb2.ToolChoice(mode=types_pb2.TOOL_CHOICE_MODE_NONE)
    outcome = await run(stub, chat(FEW_SHOT, none, max_tokens=48))
    assert outcome.end.finish_reason != types_pb2.FINISH_REASON_TOOL_CALLS
    assert outcome.choices[0].calls == {}


async def test_history_with_calls_and_results_renders_and_generates(
    stub: inference_pb2_grpc.InferenceServiceStub,
) -> None:
    request = chat(FEW_SHOT, types_pb2.ToolChoice(mode=types_pb2.TOOL_CHOICE_MODE_NONE))
    count = await stub.CountTokens(
        inference_pb2.CountTokensRequest(
            model=DEFAULT_MODEL, chat=request.chat, tools=request.tools
        )
    )
    # The prompt the server rendered is the bundled template's rendering of the same history.
    template = ChatTemplate(GEMMA_CHAT_TEMPLATE, "<bos>", "<eos>")
    history = (
        Message("user", "What is the weather in Rome and in Oslo?"),
        Message(
            "assistant",
            "",
            tool_calls=(
                ToolCall("call_a", "get_weather", '{"city": "Rome", "unit": "celsius"}'),
                ToolCall("call_b", "get_weather", '{"city": "Oslo", "unit": "celsius"}'),
            ),
        ),
        Message("tool", "21 C, sunny", tool_call_id="call_a"),
        Message("tool", "3 C, snow", tool_call_id="call_b"),
        Message("assistant", "Rome: 21 C. Oslo: 3 C."),
        Message("user", "What is the weather in Paris and in Nice?"),
    )
    tools = [
        {"type": "function", "function": {"name": t.name, "description": t.description,
                                          "parameters": json.loads(t.parameters)}}
        for t in (WEATHER, TIME)
    ]  # fmt: skip
    text = template.render(history, tools)
    assert '<tool_response id="call_b" name="get_weather">\n3 C, snow\n</tool_response>' in text
    tokens = await stub.Tokenize(
        inference_pb2.TokenizeRequest(model=DEFAULT_MODEL, text=text, add_special=False)
    )
    assert count.prompt_tokens == len(tokens.tokens)
    outcome = await run(stub, request)
    assert outcome.end.usage.prompt_tokens == count.prompt_tokens
    assert outcome.end.usage.completion_tokens > 0


@pytest.mark.parametrize("with_tools", [True, False])
async def test_count_tokens_equals_the_prompt_tokens_of_a_generation(
    stub: inference_pb2_grpc.InferenceServiceStub, with_tools: bool
) -> None:
    request = chat([user("What is the weather in Paris?")], REQUIRED, max_tokens=4)
    if not with_tools:
        request.ClearField("tools")
    count = await stub.CountTokens(
        inference_pb2.CountTokensRequest(
            model=DEFAULT_MODEL, chat=request.chat, tools=request.tools
        )
    )
    outcome = await run(stub, request)
    assert count.prompt_tokens == outcome.end.usage.prompt_tokens
    raw = await stub.CountTokens(inference_pb2.CountTokensRequest(model=DEFAULT_MODEL, prompt="Hi"))
    assert raw.prompt_tokens == 2  # <bos> and "Hi"


async def test_n_choices_each_call_and_are_summed(
    stub: inference_pb2_grpc.InferenceServiceStub,
) -> None:
    request = chat(
        [user("What is the weather in Paris?")],
        REQUIRED,
        parallel=False,
        temperature=0.8,
        seed=7,
        n=3,
    )
    outcome = await run(stub, request)
    assert sorted(outcome.choices) == [0, 1, 2]
    ends = outcome.end.choices
    assert [c.index for c in ends] == [0, 1, 2]
    assert all(c.finish_reason == types_pb2.FINISH_REASON_TOOL_CALLS for c in ends)
    assert outcome.end.usage.completion_tokens == sum(c.completion_tokens for c in ends)
    for choice in outcome.choices.values():
        assert len(assert_valid_calls(choice)) == 1


async def drain(
    stream: AsyncIterator[inference_pb2.GenerateResponse],
    into: list[inference_pb2.GenerateResponse],
) -> None:
    async for response in stream:
        into.append(response)


def invalid(**changes: object) -> inference_pb2.GenerateRequest:
    request = chat([user("hi")], REQUIRED)
    for name, value in changes.items():
        if name == "tool":
            request.tools.tools[0].CopyFrom(value)  # type: ignore[arg-type]
        elif name == "choice":
            request.tools.choice.CopyFrom(value)  # type: ignore[arg-type]
        elif name == "messages":
            request.chat.ClearField("messages")
            request.chat.messages.extend(value)  # type: ignore[arg-type]
        elif name == "prompt":
            request.prompt = str(value)
    return request


@pytest.mark.parametrize(
    ("request_", "field_"),
    [
        (invalid(tool=types_pb2.Tool(name="no spaces")), "tools.tools[0].name"),
        (invalid(tool=types_pb2.Tool(name="get_time")), "tools.tools[1].name"),
        (invalid(tool=types_pb2.Tool(name="x", parameters="{oops")), "tools.tools[0].parameters"),
        (
            invalid(tool=types_pb2.Tool(name="x", parameters='{"type": "array"}')),
            "tools.tools[0].parameters",
        ),
        (
            invalid(
                choice=types_pb2.ToolChoice(
                    mode=types_pb2.TOOL_CHOICE_MODE_FUNCTION, function_name="nope"
                )
            ),
            "tools.choice.function_name",
        ),
        (invalid(prompt="a raw prompt"), "tools"),
        (chat([user("hi")], REQUIRED, tools=()), "tools.tools"),
        (chat([user("hi")], n=0), "sampling.n"),
        (invalid(messages=[user("hi"), result("", "orphan")]), "messages[1].tool_call_id"),
        (
            invalid(
                messages=[
                    user("hi"),
                    types_pb2.ChatMessage(
                        role=types_pb2.ROLE_ASSISTANT,
                        tool_calls=[types_pb2.ToolCall(id="c1", name="get_time", arguments="{x")],
                    ),
                ]
            ),
            "messages[1].tool_calls[0].arguments",
        ),
    ],
)
async def test_invalid_tools_are_refused_naming_the_field(
    stub: inference_pb2_grpc.InferenceServiceStub,
    request_: inference_pb2.GenerateRequest,
    field_: str,
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        [r async for r in stub.Generate(request_)]
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    error = from_rpc_error(caught.value)
    assert isinstance(error, InvalidArgument)
    assert error.field == field_
    # The server is still healthy after refusing.
    assert (await run(stub, chat([user("hi")], REQUIRED, max_tokens=24))).end.model


async def test_a_schema_the_grammar_engine_cannot_enforce_fails_before_any_token(
    stub: inference_pb2_grpc.InferenceServiceStub,
) -> None:
    # uniqueItems: the grammar engine cannot enforce it; the schema is enforced whether or not
    # the tool is strict, so the request is refused rather than the keyword skipped.
    bad = {"type": "object", "properties": {"a": {"type": "array", "uniqueItems": True}}}
    tool = types_pb2.Tool(name="x", parameters=json.dumps(bad), strict=False)
    responses: list[inference_pb2.GenerateResponse] = []
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await drain(stub.Generate(chat([user("hi")], REQUIRED, tools=(tool,))), responses)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert responses == []
    error = from_rpc_error(caught.value)
    assert error.field == "tools.tools[0].parameters"
    assert "uniqueItems" in error.message


GREETING = {
    "type": "object",
    "properties": {"greeting": {"type": "string", "maxLength": 20}},
    "required": ["greeting"],
    "additionalProperties": False,
}


def with_response_format(request: inference_pb2.GenerateRequest) -> inference_pb2.GenerateRequest:
    request.sampling.constraint.json_schema.schema = json.dumps(GREETING)
    return request


async def test_auto_with_a_response_format_calls_or_answers_in_that_format(
    stub: inference_pb2_grpc.InferenceServiceStub,
) -> None:
    auto = types_pb2.ToolChoice(mode=types_pb2.TOOL_CHOICE_MODE_AUTO)
    called = await run(stub, with_response_format(chat(FEW_SHOT, auto, max_tokens=160)))
    assert called.end.finish_reason == types_pb2.FINISH_REASON_TOOL_CALLS
    assert assert_valid_calls(called.choices[0])
    # The model favours calling; banning every token that could start the call opener leaves
    # the response format as the grammar's only way (what a model that chose to answer does).
    banned = {}
    for size in range(1, len("<tool_call>") + 1):
        pieces = await stub.Tokenize(
            inference_pb2.TokenizeRequest(model=DEFAULT_MODEL, text="<tool_call>"[:size])
        )
        if len(pieces.tokens) == 1:
            banned[pieces.tokens[0]] = -100.0
    assert banned
    answered = await run(
        stub,
        with_response_format(
            chat([user("Greet me in JSON.")], auto, max_tokens=48, logit_bias=banned)
        ),
    )
    assert answered.end.finish_reason == types_pb2.FINISH_REASON_STOP
    assert answered.choices[0].calls == {}
    jsonschema.validate(json.loads(answered.choices[0].content), GREETING)
    # required admits no text answer: the response format does not apply.
    forced = await run(stub, with_response_format(chat([user("Greet me in JSON.")], REQUIRED)))
    assert forced.end.finish_reason == types_pb2.FINISH_REASON_TOOL_CALLS


async def test_a_models_own_tool_template_is_used_natively(
    model_path: Path, tmp_path: Path
) -> None:
    # The default weights under a second name whose chat template renders tools itself, as a
    # GGUF that carries a Hermes-style template would.
    config = InferenceLocalConfig(
        models_dir=SHARED_MODELS_DIR,
        cache_dir=tmp_path,
        models=[ModelConfig(name="hermes", path=model_path.name, chat_template=HERMES, parallel=1)],
        keep_alive_s=0,
    )
    engine = Engine(config, CollectorRegistry())
    await engine.start()
    try:
        spec = ToolSpec(
            (Tool("get_time", TIME.description, TIME.parameters),),
            ToolChoice(ChoiceMode.REQUIRED),
        )
        messages = (Message("user", "What time is it in Oslo?"),)
        text = ChatTemplate(HERMES, "", "").render(messages, openai_tools(spec, schemas(spec)))
        assert text.startswith("<|im_start|>system\n<tools>\n")
        count = await engine.count_tokens("hermes", messages=messages, tools=spec)
        assert count == len(await engine.tokenize("hermes", text, add_special=False))
        request = Request(
            "hermes", Sampling(max_tokens=64, temperature=0.0), messages=messages, tools=spec
        )
        events = [e async for e in engine.generate(request)]
        end = events[-1]
        assert isinstance(end, End)
        assert (end.finish, end.prompt_tokens) == (Finish.TOOL_CALLS, count)
        pieces = [c for e in events if isinstance(e, Delta) for c in e.tool_calls]
        assert pieces[0].name == "get_time"
        jsonschema.validate(json.loads("".join(p.arguments for p in pieces)), TIME_SCHEMA)
    finally:
        await engine.close()
