"""Personal data in tools through the whole mesh: an e-mail address in a tool result reaches the
engine only as a placeholder, and comes back restored inside the arguments of the next tool
call, streamed or not. Proved from the engine's side: the engine, asked directly with the
placeholder conversation, writes the placeholder into the call."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import grpc
import openai
import pytest
from helpers import DEFAULT_MODEL, Mesh, mesh_settings
from openai.types.chat import ChatCompletionMessageParam, ChatCompletionToolParam

from doorman.auth import hash_api_key
from doorman.config import PrivacyConfig, TenantConfig
from slm.v1 import inference_pb2, inference_pb2_grpc, ledger_pb2, ledger_pb2_grpc, types_pb2

pytestmark = pytest.mark.e2e

KEY = "sk-e2e-tools"
EMAIL = "jane.doe@example.com"
PLACEHOLDER = "<EMAIL_ADDRESS_1>"
SEND_PARAMETERS: dict[str, Any] = {
    "type": "object",
    "properties": {"to": {"type": "string", "maxLength": 60}},
    "required": ["to"],
    "additionalProperties": False,
}
LOOKUP_PARAMETERS: dict[str, Any] = {
    "type": "object",
    "properties": {"id": {"type": "integer"}},
    "required": ["id"],
    "additionalProperties": False,
}
TOOLS: list[ChatCompletionToolParam] = [
    {
        "type": "function",
        "function": {
            "name": "lookup_contact",
            "description": "The e-mail address of a contact.",
            "parameters": LOOKUP_PARAMETERS,
        },
    },
    {
        "type": "function",
        "function": {
            "name": "send_email",
            "description": "Send an e-mail to an address.",
            "parameters": SEND_PARAMETERS,
        },
    },
]


def conversation(email: str) -> list[ChatCompletionMessageParam]:
    return [
        {"role": "user", "content": "Look up contact 7 and send them an e-mail."},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_lookup",
                    "type": "function",
                    "function": {"name": "lookup_contact", "arguments": '{"id": 7}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_lookup", "content": json.dumps({"email": email})},
    ]


@pytest.fixture(scope="module")
def privacy_mesh(model_path: object, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    state = tmp_path_factory.mktemp("tool-privacy-mesh")
    settings = mesh_settings(state)
    settings.doorman = settings.doorman.model_copy(
        update={
            "tenants": [TenantConfig(name="tools", key_hashes=[hash_api_key(KEY)])],
            "privacy": PrivacyConfig(sanitize_tiers=["local"]),
        }
    )
    mesh = Mesh(settings, state / "slm.toml", state / "mesh.log")
    mesh.start()
    yield mesh
    assert mesh.stop() == 0, mesh.log_tail()


def engine_request() -> inference_pb2.GenerateRequest:
    """The conversation as the engine must receive it from the Doorman: placeholders only."""
    request = inference_pb2.GenerateRequest(model=DEFAULT_MODEL)
    user, _, tool = conversation(PLACEHOLDER)
    request.chat.messages.add(role=types_pb2.ROLE_USER, content=str(user["content"]))
    call = request.chat.messages.add(role=types_pb2.ROLE_ASSISTANT)
    call.tool_calls.add(id="call_lookup", name="lookup_contact", arguments='{"id": 7}')
    request.chat.messages.add(
        role=types_pb2.ROLE_TOOL, tool_call_id="call_lookup", content=str(tool["content"])
    )
    for tool_param in TOOLS:
        function = tool_param["function"]
        request.tools.tools.add(
            name=function["name"],
            description=function.get("description", ""),
            parameters=json.dumps(function.get("parameters", {})),
        )
    request.tools.choice.mode = types_pb2.TOOL_CHOICE_MODE_FUNCTION
    request.tools.choice.function_name = "send_email"
    request.sampling.temperature = 0
    request.sampling.max_tokens = 48
    return request


async def engine_arguments(mesh: Mesh) -> tuple[str, int]:
    async with grpc.aio.insecure_channel(mesh.settings.doorman.inference_local) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        events = [e async for e in stub.Generate(engine_request())]
    arguments = "".join(
        piece.arguments for e in events if e.HasField("delta") for piece in e.delta.tool_calls
    )
    end = events[-1].end
    assert end.finish_reason == types_pb2.FINISH_REASON_TOOL_CALLS
    return arguments, end.usage.prompt_tokens


async def test_email_in_a_tool_result_comes_back_restored_in_the_next_call(
    privacy_mesh: Mesh,
) -> None:
    client = privacy_mesh.openai_client(KEY)
    with client:
        await check_round_trip(privacy_mesh, client)


async def check_round_trip(privacy_mesh: Mesh, client: openai.OpenAI) -> None:
    params: Any = {
        "model": DEFAULT_MODEL,
        "messages": conversation(EMAIL),
        "tools": TOOLS,
        "tool_choice": {"type": "function", "function": {"name": "send_email"}},
        "temperature": 0,
        "max_tokens": 48,
    }
    reply = client.chat.completions.create(**params)
    (choice,) = reply.choices
    assert choice.message.tool_calls is not None
    (call,) = choice.message.tool_calls
    assert call.function.name == "send_email"

    # The engine, given the placeholder conversation, writes the placeholder into the call...
    engine_args, engine_prompt_tokens = await engine_arguments(privacy_mesh)
    assert PLACEHOLDER in engine_args
    # ...and the mesh's request was exactly that conversation: same prompt, same tokens.
    assert reply.usage is not None
    assert reply.usage.prompt_tokens == engine_prompt_tokens
    # The client got the engine's call with the address put back, still valid JSON.
    assert call.function.arguments == engine_args.replace(PLACEHOLDER, EMAIL)
    assert json.loads(call.function.arguments)["to"] == json.loads(engine_args)["to"].replace(
        PLACEHOLDER, EMAIL
    )
    assert EMAIL in call.function.arguments

    # Streamed, the placeholder is split over argument fragments; it is restored all the same.
    stream = client.chat.completions.create(**params, stream=True)
    fragments: list[str] = []
    for chunk in stream:
        for c in chunk.choices:
            for delta in c.delta.tool_calls or []:
                if delta.function and delta.function.arguments:
                    fragments.append(delta.function.arguments)
    assert "".join(fragments) == call.function.arguments
    assert not any(PLACEHOLDER in fragment for fragment in fragments)

    # The ledger names the tools and counts the call; it never holds the address.
    async with grpc.aio.insecure_channel(privacy_mesh.settings.doorman.ledger) as channel:
        records = await ledger_pb2_grpc.LedgerServiceStub(channel).List(ledger_pb2.ListRequest())
    entry = records.records[-1].entry
    assert list(entry.tools_offered) == ["lookup_contact", "send_email"]
    assert list(entry.tool_calls) == ["send_email"]
    assert dict(entry.entity_counts)["EMAIL_ADDRESS"] >= 1
    assert EMAIL not in str(records)
    assert "jane.doe" not in str(records)
