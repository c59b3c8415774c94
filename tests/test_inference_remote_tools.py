"""inference-remote and tools: request bodies for vLLM and external upstreams, and their SSE
tool-call, reasoning and multi-choice deltas back as slm.v1 events.

The upstream here is FakeVllm, a fake: vLLM needs a GPU, so a loopback HTTP server replays the
SSE events vLLM's OpenAI server sends for tool calls, reasoning and n > 1 (its wire format, as
vLLM documents and emits it), and records what it was sent. A real upstream with tools (a second
mesh) is the end-to-end tests' part.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from conftest import port0
from helpers import DEFAULT_MODEL
from prometheus_client import CollectorRegistry

from inference_remote.app import InferenceRemoteApp
from inference_remote.config import InferenceRemoteConfig, RemoteModelConfig, UpstreamConfig
from inference_remote.core import (
    Constraint,
    Message,
    Request,
    Sampling,
    Tool,
    ToolCall,
    ToolChoice,
    request_body,
    validate,
)
from inference_remote.pool import Upstream
from inference_remote.upstream import Timeouts, ToolCallPiece, UpstreamClient, parse_chunk
from slm.config import DiscoveryConfig, TelemetryConfig
from slm.discovery import Connector
from slm.errors import InvalidArgument, from_rpc_error
from slm.server import GrpcService
from slm.v1 import inference_pb2, inference_pb2_grpc, types_pb2

WEATHER = types_pb2.Tool(
    name="get_weather",
    description="The weather in a city.",
    parameters=json.dumps(
        {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    ),
    strict=True,
)


class FakeVllm:
    """A fake vLLM OpenAI server on loopback: answers GET /models, records each POST body and
    replies with the SSE events it was given, or to POST /tokenize with `count`."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.bodies: list[dict[str, Any]] = []
        self.tokenized: list[dict[str, Any]] = []
        self.count = 17
        self.port = 0
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def __aenter__(self) -> FakeVllm:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode()
            request_line, *header_lines = head.split("\r\n")
            headers = {
                k.strip().lower(): v.strip()
                for k, _, v in (line.partition(":") for line in header_lines if line)
            }
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            if request_line.startswith(("GET", "POST /tokenize ")):
                if request_line.startswith("GET"):
                    payload = json.dumps({"object": "list", "data": [{"id": DEFAULT_MODEL}]})
                else:
                    self.tokenized.append(json.loads(body))
                    payload = json.dumps({"count": self.count, "tokens": [], "max_model_len": 0})
                writer.write(
                    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                    + f"content-length: {len(payload)}\r\nconnection: close\r\n\r\n".encode()
                    + payload.encode()
                )
            else:
                self.bodies.append(json.loads(body))
                writer.write(
                    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                    b"connection: close\r\n\r\n"
                )
                for event in self.events:
                    writer.write(f"data: {json.dumps(event)}\n\n".encode())
                writer.write(b"data: [DONE]\n\n")
            await writer.drain()
        finally:
            writer.close()


def chunk(*choices: dict[str, Any], usage: dict[str, int] | None = None) -> dict[str, Any]:
    event: dict[str, Any] = {"id": "chatcmpl-1", "object": "chat.completion.chunk"}
    event["choices"] = list(choices)
    if usage is not None:
        event["usage"] = usage
    return event


def choice(index: int, finish: str | None = None, **delta: Any) -> dict[str, Any]:
    return {"index": index, "delta": delta, "finish_reason": finish}


def call(index: int, arguments: str, id: str | None = None, name: str | None = None) -> Any:
    piece: dict[str, Any] = {"index": index, "function": {"arguments": arguments}}
    if id is not None:
        piece |= {"id": id, "type": "function"}
        piece["function"]["name"] = name
    return piece


# Two choices, streamed interleaved as vLLM does with n=2: reasoning, then tool calls whose
# arguments arrive in fragments; choice 1 makes two parallel calls.
TOOL_STREAM = [
    chunk(choice(0, role="assistant", content=""), choice(1, role="assistant", content="")),
    chunk(choice(0, reasoning_content="The user wants ")),
    chunk(choice(1, reasoning="Weather in two ")),
    chunk(choice(0, tool_calls=[call(0, "", id="call_a", name="get_weather")])),
    chunk(choice(1, tool_calls=[call(0, '{"city": "Pa', id="call_b", name="get_weather")])),
    chunk(choice(0, tool_calls=[call(0, '{"city": ')])),
    chunk(choice(1, tool_calls=[call(0, 'ris"}')])),
    chunk(choice(0, tool_calls=[call(0, '"Oslo"}')])),
    chunk(choice(1, tool_calls=[call(1, '{"city": "Rome"}', id="call_c", name="get_weather")])),
    chunk(choice(0, "tool_calls"), choice(1, "tool_calls")),
    chunk(usage={"prompt_tokens": 31, "completion_tokens": 24, "total_tokens": 55}),
]


def vllm_upstream(kind: str = "vllm") -> Upstream:
    client = UpstreamClient("http://127.0.0.1:1/v1", Timeouts(1, 1, 1))
    return Upstream(name="u", kind=kind, model="m", max_concurrency=1, client=client)  # type: ignore[arg-type]


def agent_request(constraint: Constraint | None = None, n: int | None = None) -> Request:
    return Request(
        model="m",
        sampling=Sampling(max_tokens=64, constraint=constraint, n=n),
        messages=(
            Message("user", "Weather in Oslo?"),
            Message("assistant", "", tool_calls=(ToolCall("call_1", "get_weather", '{"x":1}'),)),
            Message("tool", '{"temp": 3}', tool_call_id="call_1"),
        ),
        tools=(Tool("get_weather", "The weather.", WEATHER.parameters, strict=True),),
        tool_choice=ToolChoice("function", "get_weather"),
        parallel_tool_calls=False,
    )


async def test_tools_history_choice_and_n_become_openai_fields() -> None:
    upstream = vllm_upstream()
    try:
        path, body = request_body(agent_request(n=2), upstream, "m")
    finally:
        await upstream.client.aclose()
    assert path == "/chat/completions"
    assert body["n"] == 2
    assert body["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "parameters": json.loads(WEATHER.parameters),
                "description": "The weather.",
                "strict": True,
            },
        }
    ]
    assert body["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert body["parallel_tool_calls"] is False
    assert body["messages"][1:] == [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"x":1}'},
                }
            ],
        },
        {"role": "tool", "content": '{"temp": 3}', "tool_call_id": "call_1"},
    ]
    assert "response_format" not in body
    assert "structured_outputs" not in body


@pytest.mark.parametrize(
    ("constraint", "expected"),
    [
        (Constraint("json_object"), {"response_format": {"type": "json_object"}}),
        (
            Constraint("json_schema", schema='{"type": "object"}', name="out", strict=True),
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "out", "schema": {"type": "object"}, "strict": True},
                }
            },
        ),
        (Constraint("regex", pattern=r"\d+"), {"structured_outputs": {"regex": r"\d+"}}),
        (Constraint("choice", choices=("a", "b")), {"structured_outputs": {"choice": ["a", "b"]}}),
        (
            Constraint("grammar", pattern='root ::= "x"'),
            {"structured_outputs": {"grammar": 'root ::= "x"'}},
        ),
    ],
)
async def test_constraints_for_a_vllm_upstream(
    constraint: Constraint, expected: dict[str, Any]
) -> None:
    upstream = vllm_upstream()
    try:
        _, body = request_body(agent_request(constraint), upstream, "m")
    finally:
        await upstream.client.aclose()
    assert {k: body[k] for k in expected} == expected


async def test_vllm_only_constraints_are_refused_for_an_external_upstream() -> None:
    upstream = vllm_upstream("external")
    try:
        _, body = request_body(agent_request(Constraint("json_object")), upstream, "m")
        assert body["response_format"] == {"type": "json_object"}
        with pytest.raises(InvalidArgument) as caught:
            request_body(agent_request(Constraint("regex", pattern="x")), upstream, "m")
    finally:
        await upstream.client.aclose()
    assert caught.value.field == "sampling.constraint"


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (Request("m", Sampling(), prompt="x", tools=(Tool("f"),)), "tools"),
        (
            Request("m", Sampling(), messages=(Message("user", "x"),), tools=(Tool(""),)),
            "tools.tools[0].name",
        ),
        (
            Request(
                "m",
                Sampling(),
                messages=(Message("user", "x"),),
                tools=(Tool("f", parameters="{"),),
            ),
            "tools.tools[0].parameters",
        ),
        (
            Request(
                "m",
                Sampling(),
                messages=(Message("user", "x"),),
                tools=(Tool("f"),),
                tool_choice=ToolChoice("function", "g"),
            ),
            "tools.choice.function_name",
        ),
        (
            Request(
                "m",
                Sampling(constraint=Constraint("json_schema", schema="[1")),
                messages=(Message("user", "x"),),
            ),
            "sampling.constraint.json_schema.schema",
        ),
    ],
)
def test_malformed_tools_and_constraints_are_refused(request_: Request, field: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        validate(request_)
    assert caught.value.field == field


def test_sse_tool_call_and_reasoning_deltas_are_parsed() -> None:
    parsed = parse_chunk(
        chunk(
            choice(1, reasoning_content="hmm", tool_calls=[call(0, '{"a"', id="c", name="f")]),
            choice(0, "tool_calls", content="x"),
        ),
        chat=True,
    )
    second, first = parsed.choices
    assert (second.index, second.reasoning, second.text) == (1, "hmm", "")
    assert second.tool_calls == (ToolCallPiece(index=0, id="c", name="f", arguments='{"a"'),)
    assert (first.index, first.text, first.finish_reason) == (0, "x", "tool_calls")
    # vLLM 0.10 renamed the field; both are read.
    renamed = parse_chunk(chunk(choice(0, reasoning="r")), chat=True)
    assert renamed.choices[0].reasoning == "r"
    # vLLM's stop_reason names the stop string that ended a choice; a token id is not one.
    stopped = parse_chunk(chunk({**choice(0, "stop"), "stop_reason": "##"}), chat=True)
    assert stopped.choices[0].stop_sequence == "##"
    by_token = parse_chunk(chunk({**choice(0, "stop"), "stop_reason": 106}), chat=True)
    assert by_token.choices[0].stop_sequence == ""


@contextlib.asynccontextmanager
async def remote_for(
    fake: FakeVllm, kind: str = "vllm", **config: Any
) -> AsyncIterator[tuple[inference_pb2_grpc.InferenceServiceStub, int]]:
    """inference-remote over gRPC on port 0, with `fake` as its one upstream; (stub, port)."""
    remote = InferenceRemoteConfig(
        models=[
            RemoteModelConfig(
                name=DEFAULT_MODEL,
                upstreams=[UpstreamConfig(name="fake", url=fake.url, kind=kind, **config)],
            )
        ],
        health_interval_s=3600,
        adapter_registry="",
        external_allowlist=["127.0.0.1"],
    )
    metrics = CollectorRegistry()
    app = InferenceRemoteApp(remote, Connector(DiscoveryConfig(), TelemetryConfig()), metrics)
    async with (
        GrpcService(
            "inference-remote", app, port0(remote.endpoint), TelemetryConfig(), metrics
        ) as service,
        grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as channel,
    ):
        yield inference_pb2_grpc.InferenceServiceStub(channel), service.port


def generate_request(**sampling: Any) -> inference_pb2.GenerateRequest:
    return inference_pb2.GenerateRequest(
        model=DEFAULT_MODEL,
        chat=types_pb2.ChatInput(
            messages=[types_pb2.ChatMessage(role=types_pb2.ROLE_USER, content="Weather?")]
        ),
        sampling=types_pb2.SamplingParams(**sampling),
        tools=types_pb2.ToolSpec(
            tools=[WEATHER],
            choice=types_pb2.ToolChoice(mode=types_pb2.TOOL_CHOICE_MODE_REQUIRED),
        ),
    )


async def test_tool_call_stream_through_the_servicer() -> None:
    async with FakeVllm() as fake, remote_for(fake) as (stub, _):
        fake.events = TOOL_STREAM
        events = [event async for event in stub.Generate(generate_request(n=2, max_tokens=64))]
    (sent,) = fake.bodies
    assert sent["tool_choice"] == "required"
    assert sent["n"] == 2
    assert sent["tools"][0]["function"]["name"] == "get_weather"
    *deltas, last = events
    assert all(event.HasField("delta") for event in deltas)
    calls: dict[tuple[int, int], list[str]] = {}
    reasoning = {0: "", 1: ""}
    for event in deltas:
        delta = event.delta
        reasoning[delta.choice_index] += delta.reasoning
        for piece in delta.tool_calls:
            parts = calls.setdefault((delta.choice_index, piece.index), ["", "", ""])
            parts[0] += piece.id
            parts[1] += piece.name
            parts[2] += piece.arguments
    assert reasoning == {0: "The user wants ", 1: "Weather in two "}
    assert {key: (p[0], p[1], json.loads(p[2])) for key, p in calls.items()} == {
        (0, 0): ("call_a", "get_weather", {"city": "Oslo"}),
        (1, 0): ("call_b", "get_weather", {"city": "Paris"}),
        (1, 1): ("call_c", "get_weather", {"city": "Rome"}),
    }
    end = last.end
    assert end.finish_reason == types_pb2.FINISH_REASON_TOOL_CALLS
    assert (end.usage.prompt_tokens, end.usage.completion_tokens) == (31, 24)
    assert [(c.index, c.finish_reason) for c in end.choices] == [
        (0, types_pb2.FINISH_REASON_TOOL_CALLS),
        (1, types_pb2.FINISH_REASON_TOOL_CALLS),
    ]


async def test_regex_is_refused_for_an_external_upstream_before_anything_is_sent(
    tmp_path: Path,
) -> None:
    key = tmp_path / "key"
    key.write_text("sk-test")
    async with FakeVllm() as fake, remote_for(fake, "external", api_key_file=key) as (stub, _):
        request = generate_request(constraint=types_pb2.OutputConstraint(regex=r"\d+"))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in stub.Generate(request):
                pass
        assert fake.bodies == []
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert from_rpc_error(caught.value).field == "sampling.constraint"


async def test_count_tokens_asks_vllms_tokenize() -> None:
    request = generate_request()
    async with FakeVllm() as fake, remote_for(fake) as (stub, _):
        counted = await stub.CountTokens(
            inference_pb2.CountTokensRequest(
                model=DEFAULT_MODEL, chat=request.chat, tools=request.tools
            )
        )
    assert counted.prompt_tokens == fake.count
    (sent,) = fake.tokenized
    assert sent["messages"] == [{"role": "user", "content": "Weather?"}]
    assert sent["tools"][0]["function"]["name"] == "get_weather"
    assert sent["add_generation_prompt"] is True


async def test_count_tokens_without_a_vllm_upstream_is_unimplemented() -> None:
    async with FakeVllm() as fake, remote_for(fake, "openai") as (stub, _):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.CountTokens(
                inference_pb2.CountTokensRequest(model=DEFAULT_MODEL, prompt="hello")
            )
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert fake.tokenized == []
