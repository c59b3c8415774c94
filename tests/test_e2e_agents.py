"""Agent-style calls through the whole mesh (Envoy, gateway, Doorman, engine) with the official
openai SDK: tool calls forced and streamed, a tool round trip, structured outputs, n, and the
refusal of fields the mesh does not implement.

The default model is a 270M base model: these tests prove the format (a call that parses and
validates, JSON that matches its schema), not the wisdom of the model's choices.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import jsonschema
import openai
import pytest
from helpers import DEFAULT_MODEL, Mesh
from openai.types.chat import ChatCompletionMessageParam, ChatCompletionToolParam

pytestmark = pytest.mark.e2e

WEATHER_PARAMETERS: dict[str, Any] = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 40},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "unit", "days"],
    "additionalProperties": False,
}
WEATHER: ChatCompletionToolParam = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather forecast for a city.",
        "parameters": WEATHER_PARAMETERS,
        "strict": True,
    },
}
TIME: ChatCompletionToolParam = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "The local time in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 40}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
ASK: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": "What is the weather in Paris for the next three days?"}
]

# OpenAI's strict subset: nested objects, arrays, enums, $defs/$ref, anyOf, required everywhere.
PERSON_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 30},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"type": "string", "enum": ["admin", "user", "guest"]},
        "address": {"$ref": "#/$defs/address"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3},
        "manager": {"anyOf": [{"type": "string", "maxLength": 30}, {"type": "null"}]},
    },
    "required": ["name", "age", "role", "address", "tags", "manager"],
    "additionalProperties": False,
    "$defs": {
        "address": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 30},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
            },
            "required": ["city", "zip"],
            "additionalProperties": False,
        }
    },
}


@pytest.fixture(scope="module")
def client(mesh: Mesh) -> Iterator[openai.OpenAI]:
    with mesh.openai_client() as c:
        yield c


@pytest.fixture
async def aclient(mesh: Mesh) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(
        base_url=f"{mesh.base_url}/v1", api_key="unused", max_retries=0
    ) as client:
        yield client


def test_forced_named_call_parses_and_validates(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=DEFAULT_MODEL,
        messages=ASK,
        tools=[WEATHER, TIME],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        temperature=0,
        max_tokens=96,
    )
    (choice,) = reply.choices
    assert choice.finish_reason == "tool_calls"
    calls = choice.message.tool_calls
    assert calls is not None
    assert len(calls) == 1
    call = calls[0]
    assert call.type == "function"
    assert call.id
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER_PARAMETERS)
    assert reply.usage is not None
    assert reply.usage.completion_tokens > 0


def test_required_without_parallel_calls_exactly_one_tool(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=DEFAULT_MODEL,
        messages=ASK,
        tools=[WEATHER, TIME],
        tool_choice="required",
        parallel_tool_calls=False,
        temperature=0,
        max_tokens=96,
    )
    (choice,) = reply.choices
    assert choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls is not None
    (call,) = choice.message.tool_calls
    assert call.type == "function"
    schema = {"get_weather": WEATHER, "get_time": TIME}[call.function.name]["function"]
    jsonschema.validate(json.loads(call.function.arguments), schema["parameters"])


async def test_streamed_tool_call_deltas_assemble(aclient: openai.AsyncOpenAI) -> None:
    stream = await aclient.chat.completions.create(
        model=DEFAULT_MODEL,
        messages=ASK,
        tools=[WEATHER],
        tool_choice="required",
        temperature=0,
        max_tokens=96,
        stream=True,
        stream_options={"include_usage": True},
    )
    calls: dict[int, dict[str, str]] = {}
    fragments = 0
    finishes = []
    async for chunk in stream:
        for choice in chunk.choices:
            if choice.finish_reason:
                finishes.append(choice.finish_reason)
            for delta in choice.delta.tool_calls or []:
                entry = calls.setdefault(delta.index, {"id": "", "name": "", "arguments": ""})
                if delta.id:
                    assert not entry["id"], "a call's id comes once, in its first chunk"
                    entry["id"] = delta.id
                if delta.function and delta.function.name:
                    entry["name"] += delta.function.name
                if delta.function and delta.function.arguments:
                    entry["arguments"] += delta.function.arguments
                    fragments += 1
    assert finishes == ["tool_calls"]
    assert list(calls) == [0]
    assert calls[0]["id"]
    assert calls[0]["name"] == "get_weather"
    # Streamed, not sent in one piece at the end.
    assert fragments > 1
    jsonschema.validate(json.loads(calls[0]["arguments"]), WEATHER_PARAMETERS)

    # The same request without streaming gives the same call (greedy decoding).
    reply = await aclient.chat.completions.create(
        model=DEFAULT_MODEL,
        messages=ASK,
        tools=[WEATHER],
        tool_choice="required",
        temperature=0,
        max_tokens=96,
    )
    assert reply.choices[0].message.tool_calls is not None
    whole = reply.choices[0].message.tool_calls[0]
    assert whole.type == "function"
    assert whole.function.arguments == calls[0]["arguments"]


def test_tool_round_trip(client: openai.OpenAI) -> None:
    first = client.chat.completions.create(
        model=DEFAULT_MODEL,
        messages=ASK,
        tools=[WEATHER],
        tool_choice="required",
        temperature=0,
        max_tokens=96,
    )
    message = first.choices[0].message
    assert message.tool_calls is not None
    call = message.tool_calls[0]
    assert call.type == "function"
    history: list[ChatCompletionMessageParam] = [
        *ASK,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {"name": call.function.name, "arguments": call.function.arguments},
                }
            ],
        },
        {"role": "tool", "tool_call_id": call.id, "content": '{"forecast": "sunny", "high": 21}'},
    ]
    answer = client.chat.completions.create(
        model=DEFAULT_MODEL,
        messages=history,
        tools=[WEATHER],
        tool_choice="none",
        temperature=0,
        max_tokens=24,
    )
    (choice,) = answer.choices
    assert choice.finish_reason in ("stop", "length")
    assert choice.message.tool_calls is None
    assert choice.message.content
    # The tool result is part of the prompt the engine read.
    assert answer.usage is not None
    assert first.usage is not None
    assert answer.usage.prompt_tokens > first.usage.prompt_tokens


def test_json_schema_output_validates_for_twenty_seeds(client: openai.OpenAI) -> None:
    texts = set()
    for seed in range(20):
        reply = client.chat.completions.create(
            model=DEFAULT_MODEL,
            messages=[{"role": "user", "content": "Describe a person as JSON."}],
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "person", "schema": PERSON_SCHEMA, "strict": True},
            },
            temperature=0.8,
            seed=seed,
            max_tokens=200,
        )
        (choice,) = reply.choices
        assert choice.finish_reason == "stop", choice.message.content
        assert choice.message.content is not None
        jsonschema.validate(json.loads(choice.message.content), PERSON_SCHEMA)
        texts.add(choice.message.content)
    # Sampling still samples: the seeds do not all give the same object.
    assert len(texts) > 1


def test_json_object_and_choice_constraints(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=DEFAULT_MODEL,
        messages=[{"role": "user", "content": "Give me a JSON object."}],
        response_format={"type": "json_object"},
        temperature=0,
        max_tokens=64,
    )
    content = reply.choices[0].message.content
    assert content is not None
    if reply.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(content), dict)
    else:
        assert content.lstrip().startswith("{")
    choice = client.completions.create(
        model=DEFAULT_MODEL,
        prompt="The sky is",
        extra_body={"guided_choice": ["blue", "green", "red"]},
        temperature=1.0,
        seed=3,
        max_tokens=8,
    )
    assert choice.choices[0].text in ("blue", "green", "red")


def test_n_choices_each_with_its_index(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=DEFAULT_MODEL,
        messages=[{"role": "user", "content": "Name a colour."}],
        n=3,
        temperature=1.0,
        seed=7,
        max_tokens=8,
    )
    assert sorted(c.index for c in reply.choices) == [0, 1, 2]
    assert all(c.finish_reason in ("stop", "length") for c in reply.choices)
    assert reply.usage is not None
    # Usage counts every choice's tokens: at least one each, at most max_tokens each.
    assert 3 <= reply.usage.completion_tokens <= 3 * 8
    stream = client.chat.completions.create(
        model=DEFAULT_MODEL,
        messages=[{"role": "user", "content": "Name a colour."}],
        n=2,
        temperature=1.0,
        seed=7,
        max_tokens=8,
        stream=True,
    )
    finishes: dict[int, list[str]] = {0: [], 1: []}
    for chunk in stream:
        for c in chunk.choices:
            if c.finish_reason:
                finishes[c.index].append(c.finish_reason)
    assert all(len(f) == 1 for f in finishes.values()), finishes


def test_unknown_field_is_refused_by_name(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model=DEFAULT_MODEL, messages=ASK, max_tokens=4, extra_body={"frobnicate": True}
        )
    assert "frobnicate" in str(caught.value)
    # The mesh still answers after the refusal.
    reply = client.chat.completions.create(model=DEFAULT_MODEL, messages=ASK, max_tokens=2)
    assert reply.choices[0].finish_reason in ("stop", "length")


def test_a_schema_the_engine_cannot_compile_is_a_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            model=DEFAULT_MODEL,
            messages=ASK,
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "bad", "schema": {"type": "object", "$ref": "#/nowhere"}},
            },
            max_tokens=4,
        )
