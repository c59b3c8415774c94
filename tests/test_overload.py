"""Fast refusals under overload: Envoy refuses generations beyond its limit itself, and the
gateway refuses beyond its own before it reads a body.

Envoy runs for real; behind it, a stand-in gateway (an HTTP/1.1 server in this test) and a
stand-in Doorman (a grpc.aio server) hold every generation open until the test lets them end,
so that the limit is reached without a model. The stand-ins count what reaches them: a
refused request must never get there.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import logging
import subprocess
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import yaml  # type: ignore[import-untyped]
from helpers import free_port, wait_for
from starlette.routing import Route
from starlette.types import Message, Receive, Scope, Send

from gateway.admission import Admission, ClientStalled, Generations, StalledEndFilter
from gateway.config import GENERATION_PATHS, GatewayConfig
from gateway.envoy import envoy_binary, render_envoy_config
from gateway.envoy.config import EnvoyConfig
from gateway.envoy.render import GRPC_GENERATION_PATHS

LIMIT = 2
ROUTES = {path: Route(path, endpoint=lambda request: None) for path in GENERATION_PATHS}


class StandInGateway:
    """Answers generation paths with an SSE head and one event, then holds them open until
    `release`; any other path gets a small JSON answer. Keeps connections alive, as uvicorn
    does."""

    def __init__(self) -> None:
        self.generations = 0
        self.holding = 0
        self.release = asyncio.Event()
        self._changed = asyncio.Condition()
        self.server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def until_holding(self, count: int) -> None:
        async with self._changed:
            await self._changed.wait_for(lambda: self.holding == count)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            await self._serve(reader, writer)
        finally:
            self._writers.discard(writer)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while head := await reader.readuntil(b"\r\n\r\n"):
                lines = head.decode("latin-1").split("\r\n")
                path = lines[0].split()[1]
                length = next(
                    (
                        int(line.split(":")[1])
                        for line in lines
                        if line.lower().startswith("content-length")
                    ),
                    0,
                )
                await reader.readexactly(length)
                if path not in GENERATION_PATHS:
                    body = b'{"object":"list","data":[]}'
                    writer.write(
                        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                        + f"content-length: {len(body)}\r\n\r\n".encode()
                        + body
                    )
                    await writer.drain()
                    continue
                event = b"data: {}\n\n"
                writer.write(
                    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                    b"transfer-encoding: chunked\r\n\r\n"
                    + f"{len(event):x}\r\n".encode()
                    + event
                    + b"\r\n"
                )
                await writer.drain()
                async with self._changed:
                    self.generations += 1
                    self.holding += 1
                    self._changed.notify_all()
                await self.release.wait()
                async with self._changed:
                    self.holding -= 1
                    self._changed.notify_all()
                writer.write(b"0\r\n\r\n")
                await writer.drain()

    async def __aenter__(self) -> StandInGateway:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.release.set()
        assert self.server is not None
        self.server.close()
        for writer in list(self._writers):
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
        await self.server.wait_closed()

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])


class StandInDoorman:
    """A gRPC server whose DoormanService.Chat sends one message and holds the stream until
    `release` (raw bytes: the test is about the edge, not the messages)."""

    def __init__(self) -> None:
        self.calls = 0
        self.release = asyncio.Event()
        self.server = grpc.aio.server()
        self.port = 0

    async def _chat(
        self, request: bytes, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        self.calls += 1
        yield b""
        await self.release.wait()

    async def __aenter__(self) -> StandInDoorman:
        handler = grpc.method_handlers_generic_handler(
            "slm.v1.DoormanService", {"Chat": grpc.unary_stream_rpc_method_handler(self._chat)}
        )
        self.server.add_generic_rpc_handlers((handler,))
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.release.set()
        await self.server.stop(grace=None)


@contextlib.contextmanager
def envoy(gateway_port: int, doorman_port: int, tmp_path: Path) -> Iterator[EnvoyConfig]:
    config = EnvoyConfig(port=free_port(), admin_port=free_port(), max_concurrent_requests=LIMIT)
    gateway = GatewayConfig(port=gateway_port, doorman=f"127.0.0.1:{doorman_port}")
    path = tmp_path / "envoy.yaml"
    path.write_text(render_envoy_config(gateway, config))
    process = subprocess.Popen(
        [envoy_binary(config), "-c", str(path), "--disable-hot-restart", "--log-level", "warn"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert wait_for(lambda: _ready(config.admin_port)), "Envoy did not get ready"
        yield config
    finally:
        process.terminate()
        process.wait(timeout=30)


def _ready(admin_port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/ready", timeout=1) as answer:
            return bool(answer.status == 200)
    except OSError:
        return False


def chat_body() -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}


async def test_envoy_refuses_beyond_its_limit_itself(tmp_path: Path) -> None:
    async with StandInGateway() as gateway, StandInDoorman() as doorman:
        with envoy(gateway.port, doorman.port, tmp_path) as edge:
            base = f"http://127.0.0.1:{edge.port}"
            async with httpx.AsyncClient(base_url=base, timeout=30) as client:
                async with contextlib.AsyncExitStack() as held:
                    for path in GENERATION_PATHS[:LIMIT]:
                        response = await held.enter_async_context(
                            client.stream("POST", path, json=chat_body())
                        )
                        assert response.status_code == 200
                    await gateway.until_holding(LIMIT)
                    # Every generation path shares the limit: one more is refused by Envoy,
                    # in OpenAI's error shape, with when to come back.
                    for path in GENERATION_PATHS:
                        refused = await client.post(path, json=chat_body())
                        assert refused.status_code == 429, refused.text
                        assert refused.headers["retry-after"] == "1"
                        error = refused.json()["error"]
                        assert (error["type"], error["code"]) == ("rate_limit_error", "overloaded")
                        assert str(LIMIT) in error["message"]
                    assert gateway.generations == LIMIT  # none of them reached the gateway
                    # What generates nothing is not limited.
                    assert (await client.get("/v1/models")).status_code == 200
                    gateway.release.set()
                await gateway.until_holding(0)
                gateway.release.clear()
                # The slots are back: a generation goes through again.
                async with client.stream("POST", GENERATION_PATHS[0], json=chat_body()) as again:
                    assert again.status_code == 200
                    gateway.release.set()


async def test_envoy_refuses_grpc_generations_beyond_its_limit(tmp_path: Path) -> None:
    async with StandInGateway() as gateway, StandInDoorman() as doorman:
        with envoy(gateway.port, doorman.port, tmp_path) as edge:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{edge.port}") as channel:
                chat = channel.unary_stream(GRPC_GENERATION_PATHS[0])
                held = [chat(b"") for _ in range(LIMIT)]
                for call in held:
                    assert await call.read() == b""  # each stream is open at the Doorman
                refused = chat(b"")
                with pytest.raises(grpc.aio.AioRpcError) as raised:
                    await refused.read()
                assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
                trailers = dict(raised.value.trailing_metadata() or ())
                assert trailers.get("grpc-retry-pushback-ms") == "1000"
                assert doorman.calls == LIMIT
                for call in held:
                    call.cancel()


def test_generation_clusters_carry_the_configured_limit() -> None:
    envoy_config = EnvoyConfig(max_concurrent_requests=7, connection_buffer_bytes=32 << 10)
    config = yaml.safe_load(render_envoy_config(GatewayConfig(), envoy_config))
    clusters = {c["name"]: c for c in config["static_resources"]["clusters"]}
    for name in ("gateway_generation", "doorman_generation"):
        (limits,) = clusters[name]["circuit_breakers"]["thresholds"]
        assert (limits["max_requests"], limits["max_pending_requests"]) == (7, 7)
        assert clusters[name]["per_connection_buffer_limit_bytes"] == 32 << 10
    listener = config["static_resources"]["listeners"][0]
    assert listener["per_connection_buffer_limit_bytes"] == 32 << 10
    routes = listener["filter_chains"][0]["filters"][0]["typed_config"]["route_config"]
    to_generation = {
        r["match"]["path"]: r["route"]["cluster"]
        for r in routes["virtual_hosts"][0]["routes"]
        if "path" in r["match"] and "route" in r
    }
    for path in GENERATION_PATHS:
        assert to_generation[path] == "gateway_generation"
    for path in GRPC_GENERATION_PATHS:
        assert to_generation[path] == "doorman_generation"


# --- the gateway's own limit and stall timeout, on plain ASGI messages ---------------------


class HeldApp:
    """An ASGI app that starts a response and holds it until `release`."""

    def __init__(self) -> None:
        self.calls = 0
        self.release = asyncio.Event()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.calls += 1
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await self.release.wait()
        await send({"type": "http.response.body", "body": b"", "more_body": False})


def http_scope(path: str, method: str = "POST") -> Scope:
    return {"type": "http", "path": path, "method": method, "headers": []}


async def test_gateway_refuses_beyond_its_limit_before_reading_the_body() -> None:
    inner = HeldApp()
    admission = Admission(inner, Generations(LIMIT), stall_timeout_s=60, routes=ROUTES)
    sent: list[list[Message]] = []
    read = 0

    async def receive() -> Message:
        nonlocal read
        read += 1
        return {"type": "http.request", "body": b"{}", "more_body": False}

    def sender() -> Send:
        messages: list[Message] = []
        sent.append(messages)

        async def send(message: Message) -> None:
            messages.append(message)

        return send

    running = [
        asyncio.create_task(admission(http_scope(GENERATION_PATHS[0]), receive, sender()))
        for _ in range(LIMIT)
    ]
    async with asyncio.timeout(30):
        while inner.calls < LIMIT:  # noqa: ASYNC110
            await asyncio.sleep(0)
    await admission(http_scope(GENERATION_PATHS[1]), receive, sender())
    refusal = sent[-1]
    assert refusal[0]["status"] == 429
    assert (b"retry-after", b"1") in refusal[0]["headers"]
    error = json.loads(refusal[1]["body"])["error"]
    assert error["code"] == "overloaded"
    assert inner.calls == LIMIT
    assert read == 0  # refused before its body was read
    # Other routes, and other methods on the same paths, are not limited.
    other = asyncio.create_task(admission(http_scope("/v1/models", "GET"), receive, sender()))
    async with asyncio.timeout(30):
        while inner.calls < LIMIT + 1:  # noqa: ASYNC110
            await asyncio.sleep(0)
    inner.release.set()
    await asyncio.gather(*running, other)
    assert admission.generations.in_flight == 0


async def test_gateway_ends_a_request_whose_client_takes_nothing() -> None:
    inner = HeldApp()
    inner.release.set()
    admission = Admission(inner, Generations(LIMIT), stall_timeout_s=0.05, routes=ROUTES)
    never = asyncio.Event()

    async def receive() -> Message:
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def stuck(message: Message) -> None:
        await never.wait()  # the socket's buffer is full and the client reads nothing

    with pytest.raises(ClientStalled):
        await admission(http_scope(GENERATION_PATHS[0]), receive, stuck)
    assert admission.generations.in_flight == 0  # its slot is free
    # uvicorn's error for the response left incomplete is the end the gateway meant: dropped
    # in this request's task, kept for any other.
    incomplete = logging.LogRecord(
        "uvicorn.error",
        logging.ERROR,
        __file__,
        0,
        "ASGI callable returned without completing response.",
        None,
        None,
    )
    assert not StalledEndFilter().filter(incomplete)
    assert contextvars.Context().run(StalledEndFilter().filter, incomplete)
