"""The Responses API: wire models, translation, and answers the openai SDK's types parse."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from fastapi import FastAPI
from helpers import DEFAULT_MODEL, free_port, gateway_settings
from openai import AsyncOpenAI, omit
from openai.lib.streaming.responses._responses import ResponseStreamState
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter
from test_gateway_tools import gateway_over_mesh

from gateway import errors
from gateway.app import build_app
from gateway.config import GatewayConfig
from gateway.protocol import RequestInvalid
from gateway.responses.protocol import parse_responses
from gateway.responses.serving import ResponsesRendering, chat_request
from gateway.serving import GenerationBuilder
from mesh.settings import Settings
from slm.server import GrpcService
from slm.v1 import types_pb2

WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "Weather of a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
        "additionalProperties": False,
    },
    "strict": True,
}
EVENTS: TypeAdapter[ResponseStreamEvent] = TypeAdapter(ResponseStreamEvent)


def body(**fields: Any) -> bytes:
    return json.dumps({"model": "m", "input": "hi", **fields}).encode()


def refused(raw: bytes) -> RequestInvalid:
    with pytest.raises(RequestInvalid) as caught:
        parse_responses(raw)
    return caught.value


# --- wire models --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"foo": 1}, "foo"),
        ({"conversation": "c1"}, "conversation"),
        ({"previous_response_id": "resp_1"}, "previous_response_id"),
        ({"store": True}, "store"),
        ({"include": ["reasoning.encrypted_content"]}, "include"),
        ({"truncation": "auto"}, "truncation"),
        ({"reasoning": {"effort": "low"}}, "reasoning"),
        ({"background": True}, "background"),
        ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
        ({"tools": [{"type": "file_search", "vector_store_ids": []}]}, "tools[0].type"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "name": "x"}}, "tool_choice"),
        ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format.schema"),
        ({"text": {"format": {"type": "text", "name": "x"}}}, "text.format.name"),
        ({"text": {"verbosity": "low"}}, "text.verbosity"),
        (
            {"input": [{"role": "user", "content": [{"type": "input_image"}]}]},
            "input[0].content[0].type",
        ),
        ({"input": [{"type": "item_reference", "id": "x"}]}, "input[0].type"),
        ({"input": [{"type": "function_call_output", "output": "x"}]}, "input[0].call_id"),
        ({"input": [{"type": "message", "role": "user"}]}, "input[0].content"),
        ({"input": []}, "input"),
        ({"max_output_tokens": 0}, "max_output_tokens"),
        ({"top_logprobs": 2}, "top_logprobs"),
    ],
)
def test_refusals_name_the_field(fields: dict[str, Any], param: str) -> None:
    assert refused(body(**fields)).param == param


def test_accepted_without_effect() -> None:
    parse_responses(
        body(store=False, include=[], truncation="disabled", metadata={"k": "v"}, user="u")
    )


def test_conversation_with_tools_reaches_the_proto() -> None:
    request = chat_request(
        parse_responses(
            body(
                instructions="be brief",
                input=[
                    {"role": "user", "content": "weather in Paris?"},
                    {
                        "id": "msg_1",
                        "type": "message",
                        "role": "assistant",
                        "status": "completed",
                        "content": [
                            {
                                "type": "output_text",
                                "text": "Looking.",
                                "annotations": [],
                                "logprobs": [],
                            }
                        ],
                    },
                    {
                        "type": "function_call",
                        "call_id": "call_1",
                        "name": "get_weather",
                        "arguments": '{"city":"Paris"}',
                    },
                    {"type": "reasoning", "id": "rs_1", "summary": []},
                    {"type": "function_call_output", "call_id": "call_1", "output": "sunny"},
                    {
                        "type": "function_call",
                        "call_id": "call_2",
                        "name": "get_weather",
                        "arguments": "{}",
                    },
                    {
                        "type": "message",
                        "role": "developer",
                        "content": [{"type": "input_text", "text": "d"}],
                    },
                ],
                tools=[WEATHER],
                tool_choice={"type": "function", "name": "get_weather"},
                parallel_tool_calls=False,
                text={
                    "format": {
                        "type": "json_schema",
                        "name": "out",
                        "schema": {"type": "object"},
                        "strict": True,
                    }
                },
                max_output_tokens=9,
                temperature=0.0,
            )
        )
    )
    shape = [
        (m.role, m.content, [c.id for c in m.tool_calls], m.tool_call_id) for m in request.messages
    ]
    assert shape == [
        (types_pb2.ROLE_SYSTEM, "be brief", [], ""),
        (types_pb2.ROLE_USER, "weather in Paris?", [], ""),
        (types_pb2.ROLE_ASSISTANT, "Looking.", ["call_1"], ""),
        (types_pb2.ROLE_TOOL, "sunny", [], "call_1"),
        (types_pb2.ROLE_ASSISTANT, "", ["call_2"], ""),
        (types_pb2.ROLE_SYSTEM, "d", [], ""),
    ]
    spec = request.tools
    assert spec.tools[0].name == "get_weather"
    assert json.loads(spec.tools[0].parameters) == WEATHER["parameters"]
    assert spec.choice.mode == types_pb2.TOOL_CHOICE_MODE_FUNCTION
    assert spec.choice.function_name == "get_weather"
    assert not spec.parallel_tool_calls
    sampling = request.sampling
    assert sampling.max_tokens == 9
    assert sampling.HasField("temperature")
    assert sampling.constraint.json_schema.name == "out"
    assert json.loads(sampling.constraint.json_schema.schema) == {"type": "object"}


def test_json_object_format() -> None:
    request = chat_request(parse_responses(body(text={"format": {"type": "json_object"}})))
    assert request.sampling.constraint.WhichOneof("kind") == "json_object"
    assert not chat_request(parse_responses(body())).HasField("tools")


# --- answers, checked against the openai SDK's own types ----------------------------------------


def piece(index: int, arguments: str, id: str = "", name: str = "") -> types_pb2.ToolCallDelta:
    return types_pb2.ToolCallDelta(index=index, id=id, name=name, arguments=arguments)


DELTAS = [
    types_pb2.TextDelta(reasoning="let me see"),
    types_pb2.TextDelta(text="Checking"),
    types_pb2.TextDelta(text=" now."),
    types_pb2.TextDelta(tool_calls=[piece(0, '{"city":', id="call_1", name="get_weather")]),
    types_pb2.TextDelta(tool_calls=[piece(0, '"Paris"}')]),
    types_pb2.TextDelta(tool_calls=[piece(1, "{}", id="call_2", name="get_weather")]),
]
END = types_pb2.StreamEnd(
    finish_reason=types_pb2.FINISH_REASON_TOOL_CALLS,
    usage=types_pb2.Usage(prompt_tokens=12, completion_tokens=8),
    model="served",
)


def rendering(**fields: Any) -> ResponsesRendering:
    return ResponsesRendering("r1", parse_responses(body(tools=[WEATHER], **fields)))


def test_whole_response_parses_as_the_sdk_response() -> None:
    builder = GenerationBuilder()
    for delta in DELTAS:
        builder.add(delta)
    payload = rendering().whole(builder.build(END))
    response = Response.model_validate(payload)
    assert response.id == "resp_r1"
    assert response.status == "completed"
    assert response.model == "served"
    assert [item.type for item in response.output] == [
        "reasoning",
        "message",
        "function_call",
        "function_call",
    ]
    assert response.output_text == "Checking now."
    calls = [item for item in response.output if item.type == "function_call"]
    assert [(c.call_id, c.name, c.arguments) for c in calls] == [
        ("call_1", "get_weather", '{"city":"Paris"}'),
        ("call_2", "get_weather", "{}"),
    ]
    assert response.usage is not None
    assert (
        response.usage.input_tokens,
        response.usage.output_tokens,
        response.usage.total_tokens,
    ) == (12, 8, 20)
    assert payload["store"] is False
    assert response.tools[0].type == "function"


def test_cut_short_is_incomplete() -> None:
    builder = GenerationBuilder()
    builder.add(types_pb2.TextDelta(text="partial"))
    end = types_pb2.StreamEnd(finish_reason=types_pb2.FINISH_REASON_LENGTH)
    response = Response.model_validate(rendering().whole(builder.build(end)))
    assert response.status == "incomplete"
    assert response.incomplete_details is not None
    assert response.incomplete_details.reason == "max_output_tokens"


def parse_frames(frames: list[bytes]) -> list[dict[str, Any]]:
    events = []
    for frame in frames:
        name, data = frame.decode().removesuffix("\n\n").split("\n")
        event = json.loads(data.removeprefix("data: "))
        assert name == f"event: {event['type']}"
        events.append(event)
    return events


def stream(
    render: ResponsesRendering, deltas: list[types_pb2.TextDelta], end: types_pb2.StreamEnd
) -> list[dict[str, Any]]:
    frames = render.opening()
    for delta in deltas:
        frames += render.delta(delta)
    frames += render.closing(end)
    return parse_frames(frames)


def test_stream_events_are_the_official_sequence() -> None:
    events = stream(rendering(), DELTAS, END)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert [e["type"] for e in events] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.reasoning_text.delta",
        "response.reasoning_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    state: ResponseStreamState[Any] = ResponseStreamState(input_tools=omit, text_format=omit)
    texts = []
    for raw in events:
        for event in state.handle_event(EVENTS.validate_python(raw)):
            if event.type == "response.output_text.delta":
                texts.append(event.delta)
    final = state._completed_response
    assert final is not None
    assert "".join(texts) == "Checking now."
    assert final.output_text == "Checking now."
    calls = [item for item in final.output if item.type == "function_call"]
    assert [(c.call_id, c.arguments) for c in calls] == [
        ("call_1", '{"city":"Paris"}'),
        ("call_2", "{}"),
    ]
    assert final.usage is not None
    assert final.usage.total_tokens == 20
    done = [e for e in events if e["type"] == "response.function_call_arguments.done"]
    assert [d["arguments"] for d in done] == ['{"city":"Paris"}', "{}"]


def test_an_empty_answer_still_has_one_message() -> None:
    events = stream(
        rendering(), [], types_pb2.StreamEnd(finish_reason=types_pb2.FINISH_REASON_STOP)
    )
    for raw in events:
        EVENTS.validate_python(raw)
    final = Response.model_validate(events[-1]["response"])
    assert [item.type for item in final.output] == ["message"]


def test_stream_cut_short_ends_incomplete() -> None:
    end = types_pb2.StreamEnd(finish_reason=types_pb2.FINISH_REASON_LENGTH)
    events = stream(rendering(), [types_pb2.TextDelta(text="x")], end)
    last = EVENTS.validate_python(events[-1])
    assert last.type == "response.incomplete"
    assert last.response.status == "incomplete"


def test_error_after_the_start_is_an_error_event() -> None:
    render = rendering()
    frames = render.opening() + render.failure(errors.internal("boom"))
    last = EVENTS.validate_python(parse_frames(frames)[-1])
    assert last.type == "error"
    assert last.message == "boom"
    assert last.sequence_number == 2


# --- the route, without a Doorman ---------------------------------------------------------------


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    settings = Settings(gateway=GatewayConfig(doorman=f"127.0.0.1:{free_port()}"))
    app: FastAPI = build_app(gateway_settings(settings))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
            yield client


async def test_route_refuses_in_openai_shape(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/responses", content=body(previous_response_id="resp_1"))
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "previous_response_id"
    assert error["type"] == "invalid_request_error"
    down = await client.post("/v1/responses", content=body())
    assert down.status_code == 503
    schema = (await client.get("/openapi.json")).json()
    assert "ResponsesRequest" in schema["components"]["schemas"]


# --- through the real Doorman and engine, with the official openai client -----------------------

CITY: Any = {
    "type": "function",
    "name": "get_weather",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 20}},
        "required": ["city"],
        "additionalProperties": False,
    },
    "strict": True,
}


@pytest.fixture
async def openai_client(
    inference_server: GrpcService, ledger_server: GrpcService, tmp_path: Path
) -> AsyncIterator[AsyncOpenAI]:
    async with gateway_over_mesh(inference_server, ledger_server, tmp_path) as http:
        yield AsyncOpenAI(base_url="http://gateway/v1", api_key="unused", http_client=http)


async def test_text_response(openai_client: AsyncOpenAI) -> None:
    response = await openai_client.responses.create(
        model=DEFAULT_MODEL,
        instructions="Answer briefly.",
        input="Say hello.",
        max_output_tokens=8,
        temperature=0,
        store=False,
    )
    assert response.output_text
    assert response.usage is not None
    assert response.usage.output_tokens > 0


async def test_forced_function_call_streamed(openai_client: AsyncOpenAI) -> None:
    async with openai_client.responses.stream(
        model=DEFAULT_MODEL,
        input="What is the weather in Paris?",
        tools=[CITY],
        tool_choice="required",
        max_output_tokens=64,
        temperature=0,
    ) as stream:
        final = await stream.get_final_response()
    calls = [item for item in final.output if item.type == "function_call"]
    assert calls
    assert calls[0].name == "get_weather"
    arguments = json.loads(calls[0].arguments)
    assert isinstance(arguments["city"], str)


async def test_tool_round_trip_and_json_schema(openai_client: AsyncOpenAI) -> None:
    schema = {
        "type": "object",
        "properties": {"answer": {"type": "string", "maxLength": 40}},
        "required": ["answer"],
        "additionalProperties": False,
    }
    items: Any = [
        {"role": "user", "content": "What is the weather in Paris?"},
        {
            "type": "function_call",
            "call_id": "call_1",
            "name": "get_weather",
            "arguments": '{"city":"Paris"}',
        },
        {"type": "function_call_output", "call_id": "call_1", "output": "sunny, 21 C"},
    ]
    response = await openai_client.responses.create(
        model=DEFAULT_MODEL,
        input=items,
        tools=[CITY],
        tool_choice="none",
        text={"format": {"type": "json_schema", "name": "reply", "schema": schema, "strict": True}},
        max_output_tokens=64,
        temperature=0,
    )
    assert response.status == "completed"
    assert isinstance(json.loads(response.output_text)["answer"], str)


async def test_previous_response_id_is_refused_through_the_client(
    openai_client: AsyncOpenAI,
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        await openai_client.responses.create(
            model=DEFAULT_MODEL, input="x", previous_response_id="resp_1"
        )
    assert caught.value.body["param"] == "previous_response_id"  # type: ignore[index]


async def test_the_sdk_sends_its_own_output_back(openai_client: AsyncOpenAI) -> None:
    # Clients append response.output to the next input as it is (the Agents SDK does): every
    # field the SDK then sends must be one the wire models accept.
    question: Any = {"role": "user", "content": "What is the weather in Paris?"}
    first = await openai_client.responses.create(
        model=DEFAULT_MODEL,
        input=[question],
        tools=[CITY],
        tool_choice={"type": "function", "name": "get_weather"},
        max_output_tokens=64,
    )
    (call,) = [item for item in first.output if item.type == "function_call"]
    items: Any = [
        question,
        *first.output,
        {"type": "function_call_output", "call_id": call.call_id, "output": "Sunny."},
    ]
    second = await openai_client.responses.create(
        model=DEFAULT_MODEL, input=items, tools=[CITY], tool_choice="none", max_output_tokens=8
    )
    assert second.usage is not None
    assert first.usage is not None
    assert second.usage.input_tokens > first.usage.input_tokens
