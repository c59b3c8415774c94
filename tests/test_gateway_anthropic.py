"""Anthropic's Messages API: wire models, translation, and answers the SDK's types parse."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import pytest
from anthropic import AsyncAnthropic
from anthropic.lib.streaming._messages import accumulate_event
from anthropic.types import Message, RawMessageStreamEvent
from fastapi import FastAPI
from helpers import DEFAULT_MODEL, free_port, gateway_settings
from pydantic import TypeAdapter
from test_gateway_tools import gateway_over_mesh

from gateway.anthropic.protocol import parse_count_tokens, parse_messages
from gateway.anthropic.serving import (
    MessagesRendering,
    chat_request,
    count_tokens_request,
    stop_reason,
)
from gateway.app import build_app
from gateway.config import GatewayConfig
from gateway.protocol import RequestInvalid
from gateway.serving import GenerationBuilder, RenderError
from mesh.settings import Settings
from slm.server import GrpcService
from slm.v1 import types_pb2

WEATHER = {
    "name": "get_weather",
    "description": "Weather of a city",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
}
EVENTS: TypeAdapter[RawMessageStreamEvent] = TypeAdapter(RawMessageStreamEvent)


def body(**fields: Any) -> bytes:
    base: dict[str, Any] = {
        "model": "m",
        "max_tokens": 16,
        "messages": [{"role": "user", "content": "hi"}],
    }
    base.update(fields)
    return json.dumps(base).encode()


def refused(raw: bytes) -> RequestInvalid:
    with pytest.raises(RequestInvalid) as caught:
        parse_messages(raw)
    return caught.value


# --- wire models --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "where"),
    [
        ({"foo": 1}, "foo: Extra inputs are not permitted"),
        ({"thinking": {"type": "enabled", "budget_tokens": 1024}}, "thinking: Extra"),
        ({"max_tokens": None}, "max_tokens:"),
        ({"temperature": 1.5}, "temperature:"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]},
            "messages.0.content.0.type:",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "document", "source": {}}]}]},
            "messages.0.content.0.type:",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "a"},
                    {"role": "assistant", "content": [{"type": "tool_result", "tool_use_id": "x"}]},
                ]
            },
            "messages.1.content.0.type:",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "a", "id": "x"}]}]},
            "messages.0.content.0.id:",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "tool_result"}]}]},
            "messages.0.content.0.tool_use_id:",
        ),
        (
            {"tools": [{"type": "web_search_20250305", "name": "web_search", "max_uses": 5}]},
            "tools.0.type:",
        ),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "tool", "name": "nope"}},
            "tool_choice.name:",
        ),
        ({"tool_choice": {"type": "any"}}, "tool_choice:"),
        ({"output_config": {"effort": "high"}}, "output_config.effort: Extra"),
    ],
)
def test_refusals_name_the_field(fields: dict[str, Any], where: str) -> None:
    assert refused(body(**fields)).message.startswith(where)


def test_conversation_with_tools_reaches_the_proto() -> None:
    request = chat_request(
        parse_messages(
            body(
                system=[
                    {"type": "text", "text": "be brief", "cache_control": {"type": "ephemeral"}}
                ],
                messages=[
                    {"role": "user", "content": "weather in Paris?"},
                    {
                        "role": "assistant",
                        "content": [
                            {"type": "thinking", "thinking": "hm", "signature": "s"},
                            {"type": "text", "text": "Let me look."},
                            {
                                "type": "tool_use",
                                "id": "toolu_1",
                                "name": "get_weather",
                                "input": {"city": "Paris"},
                            },
                        ],
                    },
                    {
                        "role": "user",
                        "content": [
                            {
                                "type": "tool_result",
                                "tool_use_id": "toolu_1",
                                "content": [{"type": "text", "text": "sunny"}],
                            },
                            {"type": "text", "text": "and tomorrow?"},
                        ],
                    },
                    {"role": "assistant", "content": "I do not know."},
                    {
                        "role": "user",
                        "content": [
                            {
                                "type": "tool_result",
                                "tool_use_id": "toolu_2",
                                "content": "down",
                                "is_error": True,
                            }
                        ],
                    },
                ],
                tools=[WEATHER],
                tool_choice={"type": "any", "disable_parallel_tool_use": True},
                stop_sequences=["END", ""],
                temperature=0.5,
                top_k=5,
                metadata={"user_id": "u"},
            )
        )
    )
    roles = [m.role for m in request.messages]
    assert roles == [
        types_pb2.ROLE_SYSTEM,
        types_pb2.ROLE_USER,
        types_pb2.ROLE_ASSISTANT,
        types_pb2.ROLE_TOOL,
        types_pb2.ROLE_USER,
        types_pb2.ROLE_ASSISTANT,
        types_pb2.ROLE_TOOL,
    ]
    system, _, assistant, result, follow_up, _, failed = request.messages
    assert system.content == "be brief"
    assert assistant.content == "Let me look."
    (call,) = assistant.tool_calls
    assert (call.id, call.name, json.loads(call.arguments)) == (
        "toolu_1",
        "get_weather",
        {"city": "Paris"},
    )
    assert (result.tool_call_id, result.content) == ("toolu_1", "sunny")
    assert follow_up.content == "and tomorrow?"
    assert (failed.tool_call_id, failed.content) == ("toolu_2", "Error: down")
    spec = request.tools
    assert [t.name for t in spec.tools] == ["get_weather"]
    assert json.loads(spec.tools[0].parameters) == WEATHER["input_schema"]
    assert spec.choice.mode == types_pb2.TOOL_CHOICE_MODE_REQUIRED
    assert spec.HasField("parallel_tool_calls")
    assert not spec.parallel_tool_calls
    sampling = request.sampling
    assert (sampling.max_tokens, list(sampling.stop), sampling.top_k) == (16, ["END"], 5)
    assert sampling.temperature == 0.5
    assert not sampling.HasField("constraint")


def test_named_tool_and_structured_output() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    request = chat_request(
        parse_messages(
            body(
                tools=[WEATHER],
                tool_choice={"type": "tool", "name": "get_weather"},
                output_config={"format": {"type": "json_schema", "schema": schema}},
            )
        )
    )
    assert request.tools.choice.mode == types_pb2.TOOL_CHOICE_MODE_FUNCTION
    assert request.tools.choice.function_name == "get_weather"
    assert json.loads(request.sampling.constraint.json_schema.schema) == schema


def test_count_tokens_request() -> None:
    raw = json.dumps(
        {
            "model": "m",
            "system": "s",
            "messages": [{"role": "user", "content": "x"}],
            "tools": [WEATHER],
        }
    ).encode()
    request = count_tokens_request(parse_count_tokens(raw))
    assert request.model == "m"
    assert [m.content for m in request.messages] == ["s", "x"]
    assert request.tools.tools[0].name == "get_weather"


@pytest.mark.parametrize(
    ("end", "expected"),
    [
        (types_pb2.StreamEnd(finish_reason=types_pb2.FINISH_REASON_STOP), ("end_turn", None)),
        (
            types_pb2.StreamEnd(finish_reason=types_pb2.FINISH_REASON_STOP, stop_sequence="END"),
            ("stop_sequence", "END"),
        ),
        (types_pb2.StreamEnd(finish_reason=types_pb2.FINISH_REASON_LENGTH), ("max_tokens", None)),
        (types_pb2.StreamEnd(finish_reason=types_pb2.FINISH_REASON_TOOL_CALLS), ("tool_use", None)),
        (
            types_pb2.StreamEnd(finish_reason=types_pb2.FINISH_REASON_CONTENT_FILTER),
            ("refusal", None),
        ),
    ],
)
def test_stop_reasons(end: types_pb2.StreamEnd, expected: tuple[str, str | None]) -> None:
    assert stop_reason(end) == expected


# --- answers, checked against the anthropic SDK's own types -------------------------------------


def piece(index: int, arguments: str, id: str = "", name: str = "") -> types_pb2.ToolCallDelta:
    return types_pb2.ToolCallDelta(index=index, id=id, name=name, arguments=arguments)


DELTAS = [
    types_pb2.TextDelta(text="Checking"),
    types_pb2.TextDelta(text=" now."),
    types_pb2.TextDelta(tool_calls=[piece(0, '{"city":', id="call_1", name="get_weather")]),
    types_pb2.TextDelta(tool_calls=[piece(0, '"Paris"}')]),
    types_pb2.TextDelta(tool_calls=[piece(1, "{}", id="toolu_2", name="get_weather")]),
]
END = types_pb2.StreamEnd(
    finish_reason=types_pb2.FINISH_REASON_TOOL_CALLS,
    usage=types_pb2.Usage(prompt_tokens=11, completion_tokens=7),
    model="served",
)


def test_whole_message_parses_as_the_sdk_message() -> None:
    builder = GenerationBuilder()
    for delta in DELTAS:
        builder.add(delta)
    payload = MessagesRendering("r1", "m").whole(builder.build(END))
    message = Message.model_validate(payload)
    assert message.id == "msg_r1"
    assert message.model == "served"
    assert message.stop_reason == "tool_use"
    assert (message.usage.input_tokens, message.usage.output_tokens) == (11, 7)
    text, first, second = message.content
    assert text.type == "text"
    assert text.text == "Checking now."
    assert first.type == "tool_use"
    assert (first.id, first.name, first.input) == ("toolu_call_1", "get_weather", {"city": "Paris"})
    assert second.type == "tool_use"
    assert (second.id, second.input) == ("toolu_2", {})


def parse_frames(frames: list[bytes]) -> list[dict[str, Any]]:
    events = []
    for frame in frames:
        name, data = frame.decode().removesuffix("\n\n").split("\n")
        event = json.loads(data.removeprefix("data: "))
        assert name == f"event: {event['type']}"
        events.append(event)
    return events


def test_stream_events_parse_and_accumulate_with_the_sdk() -> None:
    rendering = MessagesRendering("r2", "m")
    frames = rendering.opening()
    for delta in DELTAS:
        frames += rendering.delta(delta)
    frames += rendering.closing(END)
    events = parse_frames(frames)
    assert [e["type"] for e in events] == [
        "message_start",
        "ping",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "content_block_start",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    snapshot = None
    json_bufs: dict[int, bytes] = {}
    # The SDK's stream skips pings before parsing; they are not a RawMessageStreamEvent.
    assert events[1] == {"type": "ping"}
    for raw in events[:1] + events[2:]:
        event = EVENTS.validate_python(raw)
        snapshot = accumulate_event(event=event, current_snapshot=snapshot, json_bufs=json_bufs)
    assert snapshot is not None
    assert snapshot.stop_reason == "tool_use"
    assert (snapshot.usage.input_tokens, snapshot.usage.output_tokens) == (11, 7)
    assert [b.type for b in snapshot.content] == ["text", "tool_use", "tool_use"]
    assert snapshot.content[0].text == "Checking now."  # type: ignore[union-attr]
    assert snapshot.content[1].input == {"city": "Paris"}  # type: ignore[union-attr]


def test_reasoning_is_a_thinking_block() -> None:
    rendering = MessagesRendering("r3", "m")
    frames = rendering.opening() + rendering.delta(types_pb2.TextDelta(reasoning="hmm"))
    frames += rendering.delta(types_pb2.TextDelta(text="ok"))
    frames += rendering.closing(
        types_pb2.StreamEnd(finish_reason=types_pb2.FINISH_REASON_STOP, stop_sequence="STOP")
    )
    events = [EVENTS.validate_python(e) for e in parse_frames(frames) if e["type"] != "ping"]
    starts = [e for e in events if e.type == "content_block_start"]
    assert [s.content_block.type for s in starts] == ["thinking", "text"]
    (last_delta,) = [e for e in events if e.type == "message_delta"]
    assert last_delta.delta.stop_reason == "stop_sequence"
    assert last_delta.delta.stop_sequence == "STOP"


def test_arguments_that_are_not_an_object_are_a_server_fault() -> None:
    builder = GenerationBuilder()
    builder.add(types_pb2.TextDelta(tool_calls=[piece(0, "[1]", id="c", name="f")]))
    with pytest.raises(RenderError) as caught:
        MessagesRendering("r", "m").whole(builder.build(END))
    assert caught.value.error.status == 500


# --- the routes, without a Doorman --------------------------------------------------------------


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    settings = Settings(
        gateway=GatewayConfig(doorman=f"127.0.0.1:{free_port()}", max_body_bytes=4096)
    )
    app: FastAPI = build_app(gateway_settings(settings))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
            yield client


async def test_errors_are_in_anthropic_shape(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/messages", content=body(foo=1))
    assert response.status_code == 400
    assert response.json() == {
        "type": "error",
        "error": {
            "type": "invalid_request_error",
            "message": "foo: Extra inputs are not permitted",
        },
    }
    big = await client.post("/v1/messages", content=body(system="x" * 5000))
    assert big.status_code == 413
    assert big.json()["error"]["type"] == "request_too_large"


async def test_doorman_down_is_an_anthropic_server_error(client: httpx.AsyncClient) -> None:
    for path, payload in (
        ("/v1/messages", body()),
        (
            "/v1/messages/count_tokens",
            json.dumps({"model": "m", "messages": [{"role": "user", "content": "x"}]}).encode(),
        ),
    ):
        response = await client.post(path, content=payload, headers={"x-api-key": "k"})
        assert response.status_code == 503
        assert response.json()["type"] == "error"
        assert response.json()["error"]["type"] == "overloaded_error"


async def test_openapi_documents_the_messages_bodies(client: httpx.AsyncClient) -> None:
    schema = (await client.get("/openapi.json")).json()
    assert {"MessagesRequest", "CountTokensRequest"} <= set(schema["components"]["schemas"])
    assert "/v1/messages" in schema["paths"]


# --- through the real Doorman and engine, with the official anthropic client --------------------
# This SDK no longer sends temperature, top_p or top_k; the engine's defaults sample.

CITY: Any = {
    "name": "get_weather",
    "description": "Weather of a city",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 20}},
        "required": ["city"],
        "additionalProperties": False,
    },
}


@pytest.fixture
async def anthropic_client(
    inference_server: GrpcService, ledger_server: GrpcService, tmp_path: Path
) -> AsyncIterator[AsyncAnthropic]:
    async with gateway_over_mesh(inference_server, ledger_server, tmp_path) as http:
        yield AsyncAnthropic(base_url="http://gateway", api_key="unused", http_client=http)


async def test_text_message(anthropic_client: AsyncAnthropic) -> None:
    message = await anthropic_client.messages.create(
        model=DEFAULT_MODEL,
        system="Answer briefly.",
        messages=[{"role": "user", "content": "Say hello."}],
        max_tokens=8,
    )
    assert message.content[0].type == "text"
    assert message.stop_reason in ("end_turn", "max_tokens")
    assert message.usage.input_tokens > 0


async def test_forced_tool_use_streamed(anthropic_client: AsyncAnthropic) -> None:
    async with anthropic_client.messages.stream(
        model=DEFAULT_MODEL,
        messages=[{"role": "user", "content": "What is the weather in Paris?"}],
        tools=[CITY],
        tool_choice={"type": "any"},
        max_tokens=64,
    ) as stream:
        message = await stream.get_final_message()
    assert message.stop_reason == "tool_use"
    uses = [block for block in message.content if block.type == "tool_use"]
    assert uses
    assert uses[0].name == "get_weather"
    assert uses[0].id.startswith("toolu_")
    assert isinstance(uses[0].input["city"], str)


async def test_tool_result_round_trip(anthropic_client: AsyncAnthropic) -> None:
    messages: Any = [
        {"role": "user", "content": "What is the weather in Paris?"},
        {
            "role": "assistant",
            "content": [
                {
                    "type": "tool_use",
                    "id": "toolu_1",
                    "name": "get_weather",
                    "input": {"city": "Paris"},
                }
            ],
        },
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny"}],
        },
    ]
    message = await anthropic_client.messages.create(
        model=DEFAULT_MODEL,
        messages=messages,
        tools=[CITY],
        max_tokens=16,
        stop_sequences=["\n\n"],
    )
    assert message.stop_reason in ("stop_sequence", "end_turn", "max_tokens", "tool_use")
    if message.stop_reason == "stop_sequence":
        assert message.stop_sequence == "\n\n"


async def test_count_tokens(anthropic_client: AsyncAnthropic) -> None:
    counted = await anthropic_client.messages.count_tokens(
        model=DEFAULT_MODEL,
        messages=[{"role": "user", "content": "What is the weather in Paris?"}],
        tools=[CITY],
    )
    plain = await anthropic_client.messages.count_tokens(
        model=DEFAULT_MODEL, messages=[{"role": "user", "content": "What is the weather in Paris?"}]
    )
    assert counted.input_tokens > plain.input_tokens > 0


async def test_unknown_field_is_refused_through_the_client(
    anthropic_client: AsyncAnthropic,
) -> None:
    with pytest.raises(anthropic.BadRequestError) as caught:
        await anthropic_client.messages.create(
            model=DEFAULT_MODEL,
            messages=[{"role": "user", "content": "x"}],
            max_tokens=4,
            thinking={"type": "enabled", "budget_tokens": 1024},
        )
    assert "thinking" in caught.value.message


async def test_the_sdk_sends_its_own_answer_back(anthropic_client: AsyncAnthropic) -> None:
    # Clients put the returned content blocks into the next request as they are: every field
    # the SDK then sends must be one the wire models accept.
    question: Any = {"role": "user", "content": "What is the weather in Paris?"}
    first = await anthropic_client.messages.create(
        model=DEFAULT_MODEL,
        messages=[question],
        tools=[CITY],
        tool_choice={"type": "tool", "name": "get_weather"},
        max_tokens=64,
    )
    (use,) = [b for b in first.content if b.type == "tool_use"]
    result: Any = {
        "role": "user",
        "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "Sunny."}],
    }
    second = await anthropic_client.messages.create(
        model=DEFAULT_MODEL,
        messages=[question, {"role": "assistant", "content": first.content}, result],
        tools=[CITY],
        tool_choice={"type": "none"},
        max_tokens=8,
    )
    assert second.usage.input_tokens > first.usage.input_tokens
