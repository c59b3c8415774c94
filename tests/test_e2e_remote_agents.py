"""inference-remote passes tools, structured outputs and n through to a real upstream that
serves them (a second service-slm, through its Envoy), and its tool-call deltas come back as
the same events inference-local sends."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest
from helpers import DEFAULT_MODEL, Mesh
from test_inference_remote import remote_config, running

from inference_remote.config import UpstreamConfig
from slm.v1 import inference_pb2, types_pb2

pytestmark = pytest.mark.e2e

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 40},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "days"],
    "additionalProperties": False,
}


def chat_request(**sampling: Any) -> inference_pb2.GenerateRequest:
    request = inference_pb2.GenerateRequest(model=DEFAULT_MODEL)
    request.chat.messages.add(
        role=types_pb2.ROLE_USER, content="What is the weather in Rome for two days?"
    )
    request.sampling.temperature = 0
    request.sampling.max_tokens = 64
    for name, value in sampling.items():
        setattr(request.sampling, name, value)
    return request


async def test_forced_tool_call_through_a_remote_mesh(mesh: Mesh) -> None:
    upstream = UpstreamConfig(name="mesh", url=f"{mesh.base_url}/v1", kind="openai")
    async with running(remote_config([upstream])) as remote:
        request = chat_request()
        request.tools.tools.add(
            name="get_weather", description="Weather in a city.", parameters=json.dumps(SCHEMA)
        )
        request.tools.choice.mode = types_pb2.TOOL_CHOICE_MODE_REQUIRED
        events = [e async for e in remote.stub.Generate(request)]
        pieces = [p for e in events if e.HasField("delta") for p in e.delta.tool_calls]
        end = events[-1].end
        assert end.finish_reason == types_pb2.FINISH_REASON_TOOL_CALLS
        assert end.upstream == "mesh"
        assert {p.index for p in pieces} == {0}
        assert pieces[0].id
        assert pieces[0].name == "get_weather"
        jsonschema.validate(json.loads("".join(p.arguments for p in pieces)), SCHEMA)

        # The same conversation with the call and its result in the history answers in text.
        follow = chat_request()
        follow.tools.CopyFrom(request.tools)
        follow.tools.choice.mode = types_pb2.TOOL_CHOICE_MODE_NONE
        call = follow.chat.messages.add(role=types_pb2.ROLE_ASSISTANT)
        call.tool_calls.add(
            id=pieces[0].id, name="get_weather", arguments="".join(p.arguments for p in pieces)
        )
        follow.chat.messages.add(
            role=types_pb2.ROLE_TOOL, tool_call_id=pieces[0].id, content="Sunny."
        )
        answer = [e async for e in remote.stub.Generate(follow)]
        assert answer[-1].end.finish_reason in (
            types_pb2.FINISH_REASON_STOP,
            types_pb2.FINISH_REASON_LENGTH,
        )
        assert "".join(e.delta.text for e in answer if e.HasField("delta"))


async def test_json_schema_and_n_through_a_remote_mesh(mesh: Mesh) -> None:
    upstream = UpstreamConfig(name="mesh", url=f"{mesh.base_url}/v1", kind="openai")
    async with running(remote_config([upstream])) as remote:
        request = chat_request(temperature=0.8, seed=11, n=2)
        request.sampling.constraint.json_schema.name = "forecast"
        request.sampling.constraint.json_schema.schema = json.dumps(SCHEMA)
        request.sampling.constraint.json_schema.strict = True
        events = [e async for e in remote.stub.Generate(request)]
        texts: dict[int, str] = {0: "", 1: ""}
        for event in events[:-1]:
            texts[event.delta.choice_index] += event.delta.text
        end = events[-1].end
        assert sorted(c.index for c in end.choices) == [0, 1]
        for choice in end.choices:
            if choice.finish_reason == types_pb2.FINISH_REASON_STOP:
                jsonschema.validate(json.loads(texts[choice.index]), SCHEMA)
        assert texts[0]
        assert texts[1]
        assert end.usage.completion_tokens >= 2


async def test_the_stop_string_comes_back_through_a_remote_mesh(mesh: Mesh) -> None:
    """The upstream mesh names the stop string that ended the answer (vLLM's stop_reason), and
    inference-remote hands it on, as Anthropic's stop_sequence needs it."""
    upstream = UpstreamConfig(name="mesh", url=f"{mesh.base_url}/v1", kind="openai")
    async with running(remote_config([upstream])) as remote:
        request = inference_pb2.GenerateRequest(model=DEFAULT_MODEL)
        request.chat.messages.add(role=types_pb2.ROLE_USER, content="Repeat: a, b, c, d, e, f, g")
        request.sampling.temperature = 0
        request.sampling.max_tokens = 32
        request.sampling.stop.append(",")
        events = [e async for e in remote.stub.Generate(request)]
        end = events[-1].end
        assert end.finish_reason == types_pb2.FINISH_REASON_STOP
        assert end.stop_sequence == ","
        assert "," not in "".join(e.delta.text for e in events[:-1])
