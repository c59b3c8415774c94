"""The chat WebSocket: the same chunks as SSE, errors as frames, cancel on close (via Envoy)."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import socket
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import uvicorn
from helpers import DEFAULT_MODEL, Mesh, metric_value, until, wait_for
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.typing import Origin

from gateway.app import build_app
from gateway.config import GatewaySettings
from gateway.protocol import RequestInvalid
from gateway.ui_routes import DONE_FRAME, parse_ws_request, same_origin, sse_payload

WS_PATH = "/v1/chat/completions/ws"
GREEDY = {"temperature": 0, "seed": 7, "max_tokens": 12}
MESSAGES = [{"role": "user", "content": "Name three colours."}]


# --- the core, with plain inputs ---------------------------------------------------------------


def test_frames_carry_exactly_the_sse_payload() -> None:
    assert sse_payload(b'data: {"a":1}\n\n') == '{"a":1}'
    assert sse_payload(b"data: [DONE]\n\n") == DONE_FRAME


def test_a_message_is_a_chat_request_that_streams_and_may_carry_a_key() -> None:
    body, key = parse_ws_request(json.dumps({"model": "m", "messages": MESSAGES, "api_key": "k1"}))
    assert (body.model, body.streaming, key) == ("m", True, "k1")
    body, key = parse_ws_request(json.dumps({"model": "m", "messages": MESSAGES}))
    assert key is None
    with pytest.raises(RequestInvalid, match="not valid JSON"):
        parse_ws_request("{")
    with pytest.raises(RequestInvalid, match="JSON object"):
        parse_ws_request("[]")
    with pytest.raises(RequestInvalid) as missing:
        parse_ws_request(json.dumps({"model": "m"}))
    assert missing.value.param == "messages"


def test_only_same_origin_browsers_may_connect() -> None:
    assert same_origin({"host": "mesh:8080"})
    assert same_origin({"host": "mesh:8080", "origin": "http://mesh:8080"})
    assert not same_origin({"host": "mesh:8080", "origin": "https://evil.example"})


# --- the whole mesh, through Envoy ---------------------------------------------------------------


def ws_url(mesh: Mesh) -> str:
    return mesh.base_url.replace("http://", "ws://", 1) + WS_PATH


async def answer(socket: ClientConnection, request: dict[str, Any]) -> list[dict[str, Any]]:
    """Send one request, read its frames up to [DONE], parsed."""
    await socket.send(json.dumps(request))
    chunks = []
    while (frame := await socket.recv()) != DONE_FRAME:
        chunks.append(json.loads(frame))
    return chunks


async def read_until_closed(socket: ClientConnection) -> None:
    while True:
        await socket.recv()


def sse_chunks(mesh: Mesh, request: dict[str, Any]) -> list[dict[str, Any]]:
    chunks = []
    body = {**request, "stream": True}
    with httpx.stream(
        "POST", f"{mesh.base_url}/v1/chat/completions", json=body, timeout=300
    ) as response:
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[6:]))
    return chunks


def text_of(chunks: list[dict[str, Any]]) -> str:
    return "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])


def without_ids(chunk: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in chunk.items() if k not in ("id", "created")}


def text_only(chunk: dict[str, Any]) -> bool:
    if len(chunk["choices"]) != 1:
        return False
    choice = chunk["choices"][0]
    return (
        set(choice["delta"]) == {"content"}
        and not choice["finish_reason"]
        and choice.get("logprobs") is None
    )


def joined(chunks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The chunks with each run of text-only chunks joined into one: where a stream's tokens
    split into chunks depends on timing (inference-local sends them together when they come
    faster than its stream interval, or when a reader falls behind), not on the transport."""
    out: list[dict[str, Any]] = []
    for chunk in map(without_ids, chunks):
        if out and text_only(out[-1]) and text_only(chunk):
            last = out[-1]["choices"][0]
            last["delta"] = {
                "content": last["delta"]["content"] + chunk["choices"][0]["delta"]["content"]
            }
            continue
        out.append(copy.deepcopy(chunk))
    return out


@pytest.mark.e2e
async def test_same_chunks_as_sse(mesh: Mesh) -> None:
    request = {
        "model": DEFAULT_MODEL,
        "messages": MESSAGES,
        **GREEDY,
        "stream_options": {"include_usage": True},
    }
    async with connect(ws_url(mesh)) as socket:
        frames = await answer(socket, request)
    events = sse_chunks(mesh, request)
    assert joined(frames) == joined(events)
    assert len({c["id"] for c in frames}) == 1
    finishes = [c["choices"][0]["finish_reason"] for c in frames if c["choices"]]
    assert [f for f in finishes if f] == [finishes[-1]]
    *body, last = frames
    assert last["usage"]["completion_tokens"] > 0
    assert all(c["usage"] is None for c in body)
    # The final chunk names the tier that served it: service-slm's "slm" extension.
    final = next(c for c in frames if c["choices"] and c["choices"][0]["finish_reason"])
    assert final["slm"]["tier"] == "local"
    assert final["slm"]["masked_entities"] == {} or all(
        v > 0 for v in final["slm"]["masked_entities"].values()
    )


@pytest.mark.e2e
async def test_one_socket_serves_requests_in_turn_and_errors_as_frames(mesh: Mesh) -> None:
    async with connect(ws_url(mesh)) as socket:
        first = await answer(socket, {"model": DEFAULT_MODEL, "messages": MESSAGES, **GREEDY})
        await socket.send("{not json")
        invalid = json.loads(await socket.recv())
        assert await socket.recv() == DONE_FRAME
        unknown = await answer(socket, {"model": "no-such-model", "messages": MESSAGES})
        second = await answer(socket, {"model": DEFAULT_MODEL, "messages": MESSAGES, **GREEDY})
    assert text_of(first) == text_of(second)
    assert first[0]["id"] != second[0]["id"]
    assert invalid["error"]["type"] == "invalid_request_error"
    assert len(unknown) == 1
    assert unknown[0]["error"]["type"] == "not_found_error"


def engine_counters(mesh: Mesh) -> tuple[float, float]:
    text = httpx.get(mesh.inference_metrics_url).text
    return (
        metric_value(text, "slm_engine_generated_tokens_total", model=DEFAULT_MODEL),
        metric_value(
            text, "slm_engine_requests_total", model=DEFAULT_MODEL, finish_reason="cancelled"
        ),
    )


@pytest.mark.e2e
async def test_closing_the_socket_stops_the_engine(mesh: Mesh) -> None:
    tokens_before, cancelled_before = engine_counters(mesh)
    request = {
        "model": DEFAULT_MODEL,
        "messages": [{"role": "user", "content": "Count from one to one thousand."}],
        "max_tokens": 1500,
        "temperature": 1.0,
        "seed": 3,
    }
    async with connect(ws_url(mesh)) as socket:
        await socket.send(json.dumps(request))
        received = 0
        while received < 3:
            chunk = json.loads(await socket.recv())
            received += bool(chunk["choices"] and chunk["choices"][0]["delta"].get("content"))
    assert wait_for(lambda: engine_counters(mesh)[1] == cancelled_before + 1)
    generated = engine_counters(mesh)[0] - tokens_before
    assert 3 <= generated < 1500, generated


@pytest.mark.e2e
async def test_a_second_request_while_streaming_closes_the_socket(mesh: Mesh) -> None:
    request = {"model": DEFAULT_MODEL, "messages": MESSAGES, "max_tokens": 400}
    async with connect(ws_url(mesh)) as socket:
        await socket.send(json.dumps(request))
        await socket.recv()  # the opening chunk: the generation is running
        await socket.send(json.dumps(request))
        with pytest.raises(ConnectionClosed) as closed:
            await read_until_closed(socket)
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 1008


@pytest.mark.e2e
async def test_refused_from_another_origin_and_when_too_big(mesh: Mesh) -> None:
    with pytest.raises(InvalidStatus) as refused:
        async with connect(ws_url(mesh), origin=Origin("https://evil.example")):
            pass
    assert refused.value.response.status_code == 403
    huge = json.dumps(
        {
            "model": DEFAULT_MODEL,
            "messages": [
                {"role": "user", "content": "x" * (mesh.settings.gateway.max_body_bytes + 1)}
            ],
        }
    )
    async with connect(ws_url(mesh), max_size=None) as socket:
        await socket.send(huge)
        with pytest.raises(ConnectionClosed) as closed:
            await read_until_closed(socket)
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 1009


# --- the gateway's limits apply to the socket: a gateway of its own on the session's Doorman ---


@contextlib.asynccontextmanager
async def small_gateway(mesh: Mesh, stall_timeout_s: float) -> AsyncIterator[str]:
    """A real gateway in this process, in front of the session mesh's Doorman, that runs one
    generation at a time; yields its base URL. Its sockets have small send buffers (accepted
    sockets inherit the listener's), so a client that stops reading blocks its writes within
    kilobytes rather than the megabytes loopback buffers grow to."""
    config = mesh.settings.gateway.model_copy(
        update={"port": 0, "max_concurrent_requests": 1, "stall_timeout_s": stall_timeout_s}
    )
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SMALL_BUFFER)
    listener.bind(("127.0.0.1", 0))
    app = build_app(GatewaySettings(config, mesh.settings.telemetry, mesh.settings.discovery))
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, lifespan="on"))
    serving = asyncio.create_task(server.serve(sockets=[listener]))
    try:
        await until(lambda: server.started)
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        server.should_exit = True
        await serving
        listener.close()


def small_client_socket(base: str) -> socket.socket:
    """A connected socket whose receive buffer stays small, for a client that stops reading."""
    host, port = base.removeprefix("http://").split(":")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SMALL_BUFFER)
    sock.connect((host, int(port)))
    sock.setblocking(False)
    return sock


SMALL_BUFFER = 8 << 10
LONG = {
    "model": DEFAULT_MODEL,
    "messages": [{"role": "user", "content": "Tell me a very long story."}],
    "max_tokens": 1800,
    "logit_bias": {"1": -100, "106": -100},  # no end of generation: it runs to max_tokens
}


@pytest.mark.e2e
async def test_socket_generations_count_against_the_gateways_limit(mesh: Mesh) -> None:
    async with small_gateway(mesh, stall_timeout_s=30) as base:
        url = base.replace("http://", "ws://", 1) + WS_PATH
        _, cancelled_before = engine_counters(mesh)
        async with connect(url) as holder, connect(url) as other:
            await holder.send(json.dumps(LONG))
            await holder.recv()  # generating: the gateway's one slot is taken
            async with httpx.AsyncClient(base_url=base, timeout=60) as client:
                refused = await client.post(
                    "/v1/chat/completions",
                    json={"model": DEFAULT_MODEL, "messages": MESSAGES, **GREEDY},
                )
            assert refused.status_code == 429
            assert refused.headers["retry-after"] == "1"
            assert refused.json()["error"]["code"] == "overloaded"
            # A second socket's request is refused the same way, as a frame, then [DONE].
            (frame,) = await answer(other, {"model": DEFAULT_MODEL, "messages": MESSAGES})
            assert frame["error"]["code"] == "overloaded"
            await holder.close()
            # The holder's generation ends (the engine counts it cancelled), freeing the slot.
            await until(lambda: engine_counters(mesh)[1] == cancelled_before + 1)
            served = await answer(other, {"model": DEFAULT_MODEL, "messages": MESSAGES, **GREEDY})
        assert text_of(served)


@pytest.mark.e2e
async def test_a_socket_whose_client_reads_nothing_is_dropped(
    mesh: Mesh, caplog: pytest.LogCaptureFixture
) -> None:
    # Eight choices with 20 alternatives a token: tens of kilobytes a step, which outgrow the
    # socket buffers in seconds once the client stops reading.
    heavy = {**LONG, "n": 8, "logprobs": True, "top_logprobs": 20}
    async with small_gateway(mesh, stall_timeout_s=1.0) as base:
        url = base.replace("http://", "ws://", 1) + WS_PATH
        _, cancelled_before = engine_counters(mesh)
        # max_queue=1: the client library stops reading the socket once one frame waits.
        sock = small_client_socket(base)
        async with connect(url, sock=sock, max_queue=1, max_size=None) as stalled:
            await stalled.send(json.dumps(heavy))
            await stalled.recv()
            # Reads nothing more; the gateway gives up on it and its generation ends.
            # The engine counts each of the eight choices' sequences.
            await until(lambda: engine_counters(mesh)[1] == cancelled_before + 8)
            assert "the client took no response bytes" in caplog.text
            with pytest.raises(ConnectionClosed):
                await read_until_closed(stalled)
        # Its slot is free: the gateway's one generation serves the next socket.
        async with connect(url) as next_socket:
            served = await answer(
                next_socket, {"model": DEFAULT_MODEL, "messages": MESSAGES, **GREEDY}
            )
        assert text_of(served)
