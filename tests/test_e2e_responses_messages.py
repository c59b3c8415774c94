"""The Responses API (openai SDK and the OpenAI Agents SDK) and Anthropic's Messages API (the
official anthropic SDK) through the whole mesh, streaming and not."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Annotated, Any

import agents
import anthropic
import jsonschema
import openai
import pytest
from helpers import DEFAULT_MODEL, Mesh
from pydantic import BaseModel, Field

pytestmark = pytest.mark.e2e

WEATHER_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 40},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "days"],
    "additionalProperties": False,
}
RESPONSES_TOOL: Any = {
    "type": "function",
    "name": "get_weather",
    "description": "Weather forecast for a city.",
    "parameters": WEATHER_SCHEMA,
    "strict": True,
}
ANTHROPIC_TOOL: Any = {
    "name": "get_weather",
    "description": "Weather forecast for a city.",
    "input_schema": WEATHER_SCHEMA,
}
QUESTION = "What is the weather in Oslo for the next two days?"
# The anthropic SDK takes sampling parameters in the body only.
GREEDY: Any = {"temperature": 0}


@pytest.fixture(scope="module")
def client(mesh: Mesh) -> Iterator[openai.OpenAI]:
    with mesh.openai_client() as c:
        yield c


@pytest.fixture(scope="module")
def claude(mesh: Mesh) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(base_url=mesh.base_url, api_key="unused", max_retries=0) as c:
        yield c


# --- Responses ----------------------------------------------------------------------------------


def test_responses_text(client: openai.OpenAI) -> None:
    response = client.responses.create(
        model=DEFAULT_MODEL,
        instructions="You are terse.",
        input="Name three colours.",
        max_output_tokens=16,
        temperature=0,
        store=False,
    )
    assert response.status in ("completed", "incomplete")
    assert response.output_text
    assert response.usage is not None
    assert 0 < response.usage.output_tokens <= 16
    assert response.usage.total_tokens == (
        response.usage.input_tokens + response.usage.output_tokens
    )


def test_responses_stream_events_in_order(client: openai.OpenAI) -> None:
    events = list(
        client.responses.create(
            model=DEFAULT_MODEL, input="Name three colours.", max_output_tokens=16, stream=True
        )
    )
    kinds = [e.type for e in events]
    assert kinds[0] == "response.created"
    assert kinds[-1] in ("response.completed", "response.incomplete")
    assert "response.output_text.delta" in kinds
    numbers = [e.sequence_number for e in events]
    assert numbers == sorted(numbers)
    assert len(set(numbers)) == len(numbers)
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    done = [e for e in events if e.type == "response.output_text.done"]
    assert len(done) == 1
    assert done[0].text == text
    final = events[-1].response  # type: ignore[union-attr]
    assert final.output_text == text


def test_responses_function_call_round_trip(client: openai.OpenAI) -> None:
    first = client.responses.create(
        model=DEFAULT_MODEL,
        input=QUESTION,
        tools=[RESPONSES_TOOL],
        tool_choice="required",
        temperature=0,
        max_output_tokens=64,
    )
    calls = [item for item in first.output if item.type == "function_call"]
    assert len(calls) == 1
    call = calls[0]
    assert call.name == "get_weather"
    jsonschema.validate(json.loads(call.arguments), WEATHER_SCHEMA)
    second = client.responses.create(
        model=DEFAULT_MODEL,
        input=[
            {"role": "user", "content": QUESTION},
            {
                "type": "function_call",
                "call_id": call.call_id,
                "name": call.name,
                "arguments": call.arguments,
            },
            {"type": "function_call_output", "call_id": call.call_id, "output": "Sunny, 18C."},
        ],
        tools=[RESPONSES_TOOL],
        tool_choice="none",
        temperature=0,
        max_output_tokens=16,
    )
    assert second.output_text
    assert not [item for item in second.output if item.type == "function_call"]
    assert second.usage is not None
    assert first.usage is not None
    assert second.usage.input_tokens > first.usage.input_tokens


def test_responses_streamed_function_call_arguments(client: openai.OpenAI) -> None:
    events = list(
        client.responses.create(
            model=DEFAULT_MODEL,
            input=QUESTION,
            tools=[RESPONSES_TOOL],
            tool_choice="required",
            temperature=0,
            max_output_tokens=64,
            stream=True,
        )
    )
    deltas = [e.delta for e in events if e.type == "response.function_call_arguments.delta"]
    (done,) = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert "".join(deltas) == done.arguments
    jsonschema.validate(json.loads(done.arguments), WEATHER_SCHEMA)


def test_responses_json_schema_format(client: openai.OpenAI) -> None:
    response = client.responses.create(
        model=DEFAULT_MODEL,
        input=QUESTION,
        text={
            "format": {
                "type": "json_schema",
                "name": "forecast_request",
                "schema": WEATHER_SCHEMA,
                "strict": True,
            }
        },
        temperature=0.8,
        max_output_tokens=64,
    )
    assert response.status == "completed"
    jsonschema.validate(json.loads(response.output_text), WEATHER_SCHEMA)


def test_responses_refuses_what_it_does_not_keep(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(
            model=DEFAULT_MODEL, input="Hi", previous_response_id="resp_unknown"
        )
    assert "previous_response_id" in str(caught.value)


class Forecast(BaseModel):
    city: str = Field(max_length=40)
    days: int = Field(ge=1, le=7)
    sunny: bool


def agent_model(client: openai.AsyncOpenAI, api: str) -> agents.Model:
    if api == "responses":
        return agents.OpenAIResponsesModel(model=DEFAULT_MODEL, openai_client=client)
    return agents.OpenAIChatCompletionsModel(model=DEFAULT_MODEL, openai_client=client)


@pytest.mark.parametrize("api", ["chat_completions", "responses"])
async def test_openai_agents_sdk_runs_a_tool(mesh: Mesh, api: str) -> None:
    """The OpenAI Agents SDK's loop against the mesh, over either API: the model must call the
    tool, the SDK parses the call and runs the tool with arguments that validate, and the run
    ends with the tool's output."""
    agents.set_tracing_disabled(True)
    seen: list[tuple[str, int]] = []

    # Bounded like WEATHER_SCHEMA: a base model fills an unbounded string until max_tokens.
    @agents.function_tool
    def get_weather(
        city: Annotated[str, Field(max_length=40)], days: Annotated[int, Field(ge=1, le=7)]
    ) -> str:
        """Weather forecast for a city."""
        seen.append((city, days))
        return "Sunny."

    async with openai.AsyncOpenAI(
        base_url=f"{mesh.base_url}/v1", api_key="unused", max_retries=0
    ) as client:
        agent = agents.Agent(
            name="forecaster",
            instructions="Answer weather questions with the get_weather tool.",
            model=agent_model(client, api),
            tools=[get_weather],
            model_settings=agents.ModelSettings(
                tool_choice="required", temperature=0, max_tokens=64
            ),
            tool_use_behavior="stop_on_first_tool",
        )
        result = await agents.Runner.run(agent, QUESTION, max_turns=2)
    assert len(seen) == 1
    city, days = seen[0]
    jsonschema.validate({"city": city, "days": days}, WEATHER_SCHEMA)
    assert [item.type for item in result.new_items] == ["tool_call_item", "tool_call_output_item"]
    assert result.final_output == "Sunny."


@pytest.mark.parametrize("api", ["chat_completions", "responses"])
async def test_openai_agents_sdk_structured_output(mesh: Mesh, api: str) -> None:
    """An agent with an output type: the SDK asks for its JSON schema (response_format, or
    Responses' text.format) and parses the answer into the pydantic model itself."""
    agents.set_tracing_disabled(True)
    async with openai.AsyncOpenAI(
        base_url=f"{mesh.base_url}/v1", api_key="unused", max_retries=0
    ) as client:
        agent = agents.Agent(
            name="forecaster",
            instructions="Answer with a forecast.",
            model=agent_model(client, api),
            output_type=Forecast,
            model_settings=agents.ModelSettings(temperature=0.8, max_tokens=96),
        )
        result = await agents.Runner.run(agent, QUESTION, max_turns=1)
    assert isinstance(result.final_output, Forecast)


# --- Anthropic Messages -------------------------------------------------------------------------


def test_messages_text(claude: anthropic.Anthropic) -> None:
    message = claude.messages.create(
        model=DEFAULT_MODEL,
        system="You are terse.",
        messages=[{"role": "user", "content": "Name three colours."}],
        max_tokens=16,
        extra_body=GREEDY,
    )
    assert message.role == "assistant"
    assert message.stop_reason in ("end_turn", "max_tokens")
    assert message.content[0].type == "text"
    assert message.content[0].text
    assert 0 < message.usage.output_tokens <= 16


def test_messages_stop_sequence(claude: anthropic.Anthropic) -> None:
    message = claude.messages.create(
        model=DEFAULT_MODEL,
        messages=[{"role": "user", "content": "Repeat: a, b, c, d, e, f, g"}],
        stop_sequences=[","],
        max_tokens=32,
        extra_body=GREEDY,
    )
    # Greedy decoding repeats the list, commas and all: the stop string ends the turn, is named,
    # and is not in the text.
    assert message.stop_reason == "stop_sequence"
    assert message.stop_sequence == ","
    assert "," not in "".join(b.text for b in message.content if b.type == "text")
    # Without stop sequences the same turn ends otherwise, and names none.
    free = claude.messages.create(
        model=DEFAULT_MODEL,
        messages=[{"role": "user", "content": "Repeat: a, b, c, d, e, f, g"}],
        max_tokens=8,
        extra_body=GREEDY,
    )
    assert free.stop_reason in ("end_turn", "max_tokens")
    assert free.stop_sequence is None


def test_messages_stream(claude: anthropic.Anthropic) -> None:
    with claude.messages.stream(
        model=DEFAULT_MODEL,
        messages=[{"role": "user", "content": "Name three colours."}],
        max_tokens=16,
    ) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_message()
    assert kinds[0] == "message_start"
    assert kinds[-1] == "message_stop"
    assert "content_block_delta" in kinds
    assert final.content[0].type == "text"
    assert final.content[0].text
    assert final.stop_reason in ("end_turn", "max_tokens")


def test_messages_tool_use_round_trip(claude: anthropic.Anthropic) -> None:
    first = claude.messages.create(
        model=DEFAULT_MODEL,
        messages=[{"role": "user", "content": QUESTION}],
        tools=[ANTHROPIC_TOOL],
        tool_choice={"type": "tool", "name": "get_weather"},
        max_tokens=64,
        extra_body=GREEDY,
    )
    assert first.stop_reason == "tool_use"
    uses = [b for b in first.content if b.type == "tool_use"]
    assert len(uses) == 1
    use = uses[0]
    assert use.name == "get_weather"
    jsonschema.validate(use.input, WEATHER_SCHEMA)
    second = claude.messages.create(
        model=DEFAULT_MODEL,
        messages=[
            {"role": "user", "content": QUESTION},
            {"role": "assistant", "content": first.content},
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "Sunny."}],
            },
        ],
        tools=[ANTHROPIC_TOOL],
        tool_choice={"type": "none"},
        max_tokens=16,
        extra_body=GREEDY,
    )
    assert second.stop_reason in ("end_turn", "max_tokens")
    assert second.content[0].type == "text"
    assert second.usage.input_tokens > first.usage.input_tokens


def test_messages_streamed_tool_use_assembles(claude: anthropic.Anthropic) -> None:
    with claude.messages.stream(
        model=DEFAULT_MODEL,
        messages=[{"role": "user", "content": QUESTION}],
        tools=[ANTHROPIC_TOOL],
        tool_choice={"type": "any"},
        max_tokens=64,
        extra_body=GREEDY,
    ) as stream:
        partials = [e.partial_json for e in stream if e.type == "input_json"]
        final = stream.get_final_message()
    assert final.stop_reason == "tool_use"
    (use,) = [b for b in final.content if b.type == "tool_use"]
    assert json.loads("".join(partials)) == use.input
    jsonschema.validate(use.input, WEATHER_SCHEMA)


def test_count_tokens_matches_the_prompt(claude: anthropic.Anthropic) -> None:
    params: Any = {
        "model": DEFAULT_MODEL,
        "messages": [{"role": "user", "content": QUESTION}],
        "tools": [ANTHROPIC_TOOL],
    }
    counted = claude.messages.count_tokens(**params)
    message = claude.messages.create(**params, max_tokens=1, tool_choice={"type": "none"})
    assert counted.input_tokens == message.usage.input_tokens
    assert counted.input_tokens > 0


def test_messages_unknown_field_is_refused(claude: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.BadRequestError) as caught:
        claude.messages.create(
            model=DEFAULT_MODEL,
            messages=[{"role": "user", "content": "Hi"}],
            max_tokens=4,
            extra_body={"frobnicate": 1},
        )
    assert "frobnicate" in str(caught.value)
