"""The Doorman and tools: masking tool content on the way up, restoring it in streamed calls."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest
from helpers import DEFAULT_MODEL, free_port
from test_doorman_routing import doorman_for, ledger_entries, routed_settings
from test_inference_remote_tools import FakeVllm, remote_for
from test_inference_remote_tools import call as fake_call
from test_inference_remote_tools import choice as fake_choice
from test_inference_remote_tools import chunk as fake_chunk

from doorman.config import RouteConfig, RouteStep, RoutingConfig
from doorman.core import input_fields
from doorman.outbound import Outbound
from doorman.rehydrate import JsonRehydrator
from doorman.safety import REDACTED, SafetyFilter
from doorman.sanitize import DetectionFailed, Finding, PresidioDetector, Sanitiser
from slm.errors import InvalidArgument
from slm.server import GrpcService
from slm.v1 import doorman_pb2, inference_pb2, inference_pb2_grpc, types_pb2

EMAIL = "jane.doe@example.com"
# A value that must be JSON-escaped where it lands: a quote and a backslash.
AWKWARD = 'o"hara\\x@example.com'


@pytest.fixture(scope="module")
def sanitiser() -> Sanitiser:
    return Sanitiser(PresidioDetector(["EMAIL_ADDRESS", "PHONE_NUMBER"]))


def agent_request() -> inference_pb2.GenerateRequest:
    """A conversation after one tool round trip, with an e-mail in every tool-related place."""
    arguments = json.dumps({"query": f"owner of {EMAIL}", "limit": 2})
    result = json.dumps({"owner": "Jane", "email": EMAIL, "notes": ["reach via " + EMAIL]})
    return inference_pb2.GenerateRequest(
        model="m",
        chat=types_pb2.ChatInput(
            messages=[
                types_pb2.ChatMessage(role=types_pb2.ROLE_USER, content="Who owns the account?"),
                types_pb2.ChatMessage(
                    role=types_pb2.ROLE_ASSISTANT,
                    tool_calls=[types_pb2.ToolCall(id="c1", name="lookup", arguments=arguments)],
                ),
                types_pb2.ChatMessage(role=types_pb2.ROLE_TOOL, tool_call_id="c1", content=result),
            ]
        ),
        tools=types_pb2.ToolSpec(
            tools=[
                types_pb2.Tool(
                    name="send_mail",
                    description=f"Sends mail; copies go to {EMAIL}.",
                    parameters=json.dumps(
                        {
                            "type": "object",
                            "properties": {
                                "to": {"type": "string", "description": f"e.g. {EMAIL}"},
                                "email": {"type": "string", "format": "email"},
                            },
                            "required": ["to", "email"],
                        }
                    ),
                )
            ]
        ),
    )


def test_tool_results_call_arguments_and_tool_descriptions_leave_only_as_placeholders(
    sanitiser: Sanitiser,
) -> None:
    request = agent_request()
    sanitised, masking = sanitiser.sanitize(request)
    assert EMAIL not in str(sanitised)
    assert masking.placeholders == {"<EMAIL_ADDRESS_1>": EMAIL}
    _, assistant, tool = sanitised.chat.messages
    assert json.loads(assistant.tool_calls[0].arguments) == {
        "query": "owner of <EMAIL_ADDRESS_1>",
        "limit": 2,
    }
    assert assistant.tool_calls[0].name == "lookup"
    assert assistant.tool_calls[0].id == "c1"
    assert json.loads(tool.content) == {
        "owner": "Jane",
        "email": "<EMAIL_ADDRESS_1>",
        "notes": ["reach via <EMAIL_ADDRESS_1>"],
    }
    assert tool.tool_call_id == "c1"
    spec = sanitised.tools.tools[0]
    assert spec.description == "Sends mail; copies go to <EMAIL_ADDRESS_1>."
    schema = json.loads(spec.parameters)
    # Prose is masked; property names, types and formats are structure and stay as written.
    assert schema["properties"]["to"]["description"] == "e.g. <EMAIL_ADDRESS_1>"
    assert schema["properties"]["email"] == {"type": "string", "format": "email"}
    assert schema["required"] == ["to", "email"]
    # The client's request is untouched; only the copy goes upstream.
    assert EMAIL in request.chat.messages[2].content


def test_tool_content_without_personal_data_keeps_its_spelling(sanitiser: Sanitiser) -> None:
    arguments = '{"city":"Paris",  "days":3}'
    request = inference_pb2.GenerateRequest(
        model="m",
        chat=types_pb2.ChatInput(
            messages=[
                types_pb2.ChatMessage(
                    role=types_pb2.ROLE_ASSISTANT,
                    tool_calls=[types_pb2.ToolCall(id="c", name="f", arguments=arguments)],
                ),
                types_pb2.ChatMessage(role=types_pb2.ROLE_TOOL, content='{"t":  21}'),
            ]
        ),
    )
    sanitised, masking = sanitiser.sanitize(request)
    assert sanitised.chat.messages[0].tool_calls[0].arguments == arguments
    assert sanitised.chat.messages[1].content == '{"t":  21}'
    assert not masking.placeholders


class BrokenDetector:
    def detect(self, text: str) -> list[Finding]:
        raise RuntimeError("detector crashed")


def test_detection_failure_in_a_tool_result_fails_closed() -> None:
    with pytest.raises(DetectionFailed):
        Sanitiser(BrokenDetector()).sanitize(agent_request())


def split_everywhere(text: str) -> list[list[str]]:
    """Every split of `text` into two fragments, and into single characters."""
    return [[text[:cut], text[cut:]] for cut in range(len(text) + 1)] + [list(text)]


@pytest.mark.parametrize("value", [EMAIL, AWKWARD])
def test_arguments_split_at_every_offset_restore_to_valid_json(value: str) -> None:
    placeholders = {"<EMAIL_ADDRESS_1>": value}
    streamed = '{"to": "<EMAIL_ADDRESS_1>", "cc": ["x <EMAIL_ADDRESS_1> y"], "s": "a\\"<b"}'
    expected = {"to": value, "cc": [f"x {value} y"], "s": 'a"<b'}
    for fragments in split_everywhere(streamed):
        rehydrator = JsonRehydrator(placeholders)
        restored = "".join(rehydrator.feed(f) for f in fragments) + rehydrator.flush()
        assert json.loads(restored) == expected, fragments


def test_a_bare_placeholder_in_arguments_becomes_a_json_string() -> None:
    rehydrator = JsonRehydrator({"<EMAIL_ADDRESS_1>": AWKWARD})
    restored = rehydrator.feed('{"to": <EMAIL_ADD') + rehydrator.feed("RESS_1>}")
    assert json.loads(restored + rehydrator.flush()) == {"to": AWKWARD}


def call_delta(
    choice: int, index: int, arguments: str, id: str = "", name: str = ""
) -> types_pb2.TextDelta:
    return types_pb2.TextDelta(
        choice_index=choice,
        tool_calls=[types_pb2.ToolCallDelta(index=index, id=id, name=name, arguments=arguments)],
    )


def assemble(deltas: list[types_pb2.TextDelta]) -> dict[tuple[int, int], dict[str, str]]:
    """What a client does with the stream: concatenates each call's pieces."""
    calls: dict[tuple[int, int], dict[str, str]] = {}
    for delta in deltas:
        for piece in delta.tool_calls:
            call = calls.setdefault(
                (delta.choice_index, piece.index), {"id": "", "name": "", "arguments": ""}
            )
            call["id"] += piece.id
            call["name"] += piece.name
            call["arguments"] += piece.arguments
    return calls


def run(outbound: Outbound, deltas: list[types_pb2.TextDelta]) -> list[types_pb2.TextDelta]:
    sent = []
    for delta in deltas:
        alive, stop = outbound.feed(delta)
        assert not stop
        if alive:
            sent.append(delta)
    return sent + outbound.flush()


def test_parallel_calls_and_choices_are_restored_each_in_its_own_channel() -> None:
    placeholders = {"<EMAIL_ADDRESS_1>": AWKWARD, "<PHONE_NUMBER_1>": "+44 20 7946 0958"}
    first = '{"to": "<EMAIL_ADDRESS_1>"}'
    second = '{"phone": "<PHONE_NUMBER_1>"}'
    deltas = [
        call_delta(0, 0, first[:9], id="a", name="send_mail"),
        call_delta(0, 1, second[:14], id="b", name="call"),
        call_delta(1, 0, first[:12], id="c", name="send_mail"),
        call_delta(0, 0, first[9:]),
        call_delta(1, 0, first[12:]),
        types_pb2.TextDelta(choice_index=1, reasoning="Mail <EMAIL_ADD"),
        types_pb2.TextDelta(choice_index=0, text="Calling <PHONE_NU"),
        call_delta(0, 1, second[14:]),
        types_pb2.TextDelta(choice_index=1, reasoning="RESS_1> now"),
        types_pb2.TextDelta(choice_index=0, text="MBER_1>"),
    ]
    sent = run(Outbound(placeholders, lambda: None), deltas)
    calls = assemble(sent)
    assert {key: (c["id"], c["name"]) for key, c in calls.items()} == {
        (0, 0): ("a", "send_mail"),
        (0, 1): ("b", "call"),
        (1, 0): ("c", "send_mail"),
    }
    assert json.loads(calls[0, 0]["arguments"]) == {"to": AWKWARD}
    assert json.loads(calls[1, 0]["arguments"]) == {"to": AWKWARD}
    assert json.loads(calls[0, 1]["arguments"]) == {"phone": "+44 20 7946 0958"}
    texts = {0: "", 1: ""}
    reasoning = {0: "", 1: ""}
    for delta in sent:
        texts[delta.choice_index] += delta.text
        reasoning[delta.choice_index] += delta.reasoning
    assert texts == {0: "Calling +44 20 7946 0958", 1: ""}
    assert reasoning == {0: "", 1: f"Mail {AWKWARD} now"}


def test_the_first_piece_of_a_call_goes_out_even_when_its_arguments_are_held_back() -> None:
    outbound = Outbound({"<EMAIL_ADDRESS_1>": EMAIL}, lambda: None)
    delta = call_delta(0, 0, '{"to": "<EMAIL', id="call_1", name="send_mail")
    alive, _ = outbound.feed(delta)
    assert alive
    assert delta.tool_calls[0].id == "call_1"
    assert delta.tool_calls[0].arguments == '{"to": "'


@pytest.mark.parametrize(
    ("where", "field"),
    [
        ("arguments", "messages[1].tool_calls[0].arguments"),
        ("result", "messages[2].content"),
        ("description", "tools[0].description"),
    ],
)
def test_the_input_filter_sees_tool_content(where: str, field: str) -> None:
    """Tool-call arguments in the history and tool descriptions reach the model as text: a deny
    rule refuses them as it refuses a message, and names the field."""
    safety = SafetyFilter([r"\bdrop\s+table\b"], [])
    request = agent_request()
    safety.check_fields(input_fields(request))
    if where == "arguments":
        request.chat.messages[1].tool_calls[0].arguments = '{"sql": "DROP TABLE users"}'
    elif where == "result":
        request.chat.messages[2].content = '{"next": "drop table users"}'
    else:
        request.tools.tools[0].description = "Then drop  table users."
    with pytest.raises(InvalidArgument) as caught:
        safety.check_fields(input_fields(request))
    assert caught.value.field == field


def test_the_output_filter_sees_tool_call_arguments() -> None:
    safety = SafetyFilter([], [r"secret-\d+"], redact=True, window=16)
    outbound = Outbound({}, safety.output_filter)
    sent = run(
        outbound,
        [
            call_delta(0, 0, '{"code": "sec', id="a", name="f"),
            call_delta(0, 0, 'ret-42", "ok": true}'),
        ],
    )
    arguments = assemble(sent)[0, 0]["arguments"]
    assert json.loads(arguments) == {"code": REDACTED, "ok": True}
    assert outbound.triggered

    ending = SafetyFilter([], ["forbidden"], redact=False, window=16)
    outbound = Outbound({}, ending.output_filter)
    alive, stop = outbound.feed(call_delta(0, 0, '{"a": "forbidden"}', id="a", name="f"))
    assert stop
    assert alive
    # A match in the answer text ends the stream: the same delta's other texts stay behind.
    outbound = Outbound({}, ending.output_filter)
    delta = call_delta(0, 0, '{"a": 1}', id="a", name="f")
    delta.text = "this is forbidden"
    delta.reasoning = "more"
    alive, stop = outbound.feed(delta)
    assert stop
    assert (delta.text, delta.reasoning, len(delta.tool_calls)) == ("this is ", "", 0)


# Through real gRPC servers: Doorman -> inference-remote -> FakeVllm (a fake: vLLM needs a GPU;
# see test_inference_remote_tools), and Doorman -> inference-local with the real model.


def remote_chain(remote_port: int, *, sanitize: bool) -> RoutingConfig:
    return RoutingConfig(
        routes=[
            RouteConfig(
                model="agent",
                chain=[
                    RouteStep(
                        tier="gpu",
                        upstream=f"127.0.0.1:{remote_port}",
                        model=DEFAULT_MODEL,
                        sanitize=sanitize,
                    )
                ],
            )
        ]
    )


MAIL_TOOL = types_pb2.Tool(
    name="send_mail",
    description=f"Sends mail; a copy goes to {EMAIL}.",
    parameters=json.dumps({"type": "object", "properties": {"to": {"type": "string"}}}),
)


def agent_chat(model: str = "agent") -> doorman_pb2.ChatRequest:
    return doorman_pb2.ChatRequest(
        model=model,
        messages=[
            types_pb2.ChatMessage(role=types_pb2.ROLE_USER, content="Mail the owner."),
            types_pb2.ChatMessage(
                role=types_pb2.ROLE_ASSISTANT,
                tool_calls=[types_pb2.ToolCall(id="c1", name="lookup", arguments="{}")],
            ),
            types_pb2.ChatMessage(
                role=types_pb2.ROLE_TOOL,
                tool_call_id="c1",
                content=json.dumps({"owner": "Jane", "email": EMAIL}),
            ),
        ],
        sampling=types_pb2.SamplingParams(max_tokens=32),
        tools=types_pb2.ToolSpec(
            tools=[MAIL_TOOL],
            choice=types_pb2.ToolChoice(mode=types_pb2.TOOL_CHOICE_MODE_REQUIRED),
        ),
    )


# The model's answer as the upstream streams it: the placeholder it was given comes back in the
# call's arguments, split inside the placeholder and across events.
CALL_ARGUMENTS = '{"to": "<EMAIL_ADDRESS_1>", "subject": "Hi"}'
CALL_STREAM = [
    fake_chunk(fake_choice(0, role="assistant", content="")),
    fake_chunk(fake_choice(0, tool_calls=[fake_call(0, "", id="call_9", name="send_mail")])),
    fake_chunk(fake_choice(0, tool_calls=[fake_call(0, CALL_ARGUMENTS[:13])])),
    fake_chunk(fake_choice(0, tool_calls=[fake_call(0, CALL_ARGUMENTS[13:20])])),
    fake_chunk(fake_choice(0, tool_calls=[fake_call(0, CALL_ARGUMENTS[20:])])),
    fake_chunk(fake_choice(0, "tool_calls")),
    fake_chunk(usage={"prompt_tokens": 40, "completion_tokens": 12, "total_tokens": 52}),
]


async def test_tool_round_trip_leaves_masked_and_comes_back_restored(
    ledger_server: GrpcService, tmp_path: Path
) -> None:
    async with FakeVllm() as fake, remote_for(fake) as (_, remote_port):
        fake.events = CALL_STREAM
        settings = routed_settings(
            tmp_path, ledger_server, remote_chain(remote_port, sanitize=True), "127.0.0.1:1"
        )
        async with doorman_for(settings) as (stub, service):
            events = [event async for event in stub.Chat(agent_chat())]
            entries = await ledger_entries(ledger_server, service)
    # What left the mesh: placeholders only, and still valid JSON everywhere.
    (sent,) = fake.bodies
    assert EMAIL not in json.dumps(sent)
    assert json.loads(sent["messages"][2]["content"]) == {
        "owner": "Jane",
        "email": "<EMAIL_ADDRESS_1>",
    }
    assert (
        sent["tools"][0]["function"]["description"]
        == "Sends mail; a copy goes to <EMAIL_ADDRESS_1>."
    )
    assert sent["tool_choice"] == "required"
    # What the client got: the call with the value restored.
    *deltas, last = events
    calls = assemble([event.delta for event in deltas])
    assert calls[0, 0]["id"] == "call_9"
    assert calls[0, 0]["name"] == "send_mail"
    assert json.loads(calls[0, 0]["arguments"]) == {"to": EMAIL, "subject": "Hi"}
    assert last.end.finish_reason == types_pb2.FINISH_REASON_TOOL_CALLS
    assert dict(last.end.masked_entities) == {"EMAIL_ADDRESS": 1}
    # The ledger: names and counts, never arguments or results.
    (entry,) = entries
    assert list(entry.tools_offered) == ["send_mail"]
    assert list(entry.tool_calls) == ["send_mail"]
    assert entry.constraint == "tools"
    assert dict(entry.entity_counts) == {"EMAIL_ADDRESS": 1}
    assert EMAIL not in str(entry)
    assert "subject" not in str(entry)


async def test_count_tokens_skips_a_dead_tier_and_counts_on_the_live_one(
    inference_server: GrpcService, ledger_server: GrpcService, tmp_path: Path
) -> None:
    live = f"127.0.0.1:{inference_server.port}"
    routing = RoutingConfig(
        routes=[
            RouteConfig(
                model="chained",
                chain=[
                    RouteStep(tier="gpu", upstream=f"127.0.0.1:{free_port()}", model=DEFAULT_MODEL),
                    RouteStep(tier="local", upstream=live, model=DEFAULT_MODEL),
                ],
            )
        ]
    )
    request = agent_chat("chained")
    async with doorman_for(routed_settings(tmp_path, ledger_server, routing, live)) as (stub, _):
        counted = await stub.CountTokens(
            doorman_pb2.DoormanServiceCountTokensRequest(
                model="chained", messages=request.messages, tools=request.tools
            )
        )
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.CountTokens(doorman_pb2.DoormanServiceCountTokensRequest(model="chained"))
    async with grpc.aio.insecure_channel(live) as channel:
        direct = await inference_pb2_grpc.InferenceServiceStub(channel).CountTokens(
            inference_pb2.CountTokensRequest(
                model=DEFAULT_MODEL,
                chat=types_pb2.ChatInput(messages=request.messages),
                tools=request.tools,
            )
        )
    assert counted.prompt_tokens == direct.prompt_tokens > 0
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_count_tokens_is_of_the_sanitised_request(
    ledger_server: GrpcService, tmp_path: Path
) -> None:
    request = agent_chat()
    count = doorman_pb2.DoormanServiceCountTokensRequest(
        model="agent", messages=request.messages, tools=request.tools
    )
    async with FakeVllm() as fake, remote_for(fake) as (_, remote_port):
        settings = routed_settings(
            tmp_path, ledger_server, remote_chain(remote_port, sanitize=True), "127.0.0.1:1"
        )
        async with doorman_for(settings) as (stub, _):
            counted = await stub.CountTokens(count)
    assert counted.prompt_tokens == fake.count
    (sent,) = fake.tokenized
    assert EMAIL not in json.dumps(sent)
    assert "<EMAIL_ADDRESS_1>" in sent["messages"][2]["content"]


async def test_count_tokens_on_a_tier_that_cannot_count_is_unimplemented(
    ledger_server: GrpcService, tmp_path: Path
) -> None:
    async with FakeVllm() as fake, remote_for(fake, "openai") as (_, remote_port):
        settings = routed_settings(
            tmp_path, ledger_server, remote_chain(remote_port, sanitize=True), "127.0.0.1:1"
        )
        async with doorman_for(settings) as (stub, _):
            request = agent_chat()
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.CountTokens(
                    doorman_pb2.DoormanServiceCountTokensRequest(
                        model="agent", messages=request.messages, tools=request.tools
                    )
                )
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
