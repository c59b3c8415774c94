"""A kill -9 of the Doorman right after its client got the final event loses no ledger record.

The Doorman runs as a real process (`slm serve doorman`) against the session's engine and an
in-process ledger; it is killed with SIGKILL as soon as the client holds the StreamEnd.
"""

from __future__ import annotations

import signal
import socket
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import grpc
import pytest
from helpers import DEFAULT_MODEL, ServedProcess, mesh_settings, runtime, to_toml
from prometheus_client import CollectorRegistry

from ledger.app import build_app
from mesh.settings import Settings
from slm.config import ServiceEndpoint
from slm.server import GrpcService
from slm.v1 import doorman_pb2, doorman_pb2_grpc, ledger_pb2, ledger_pb2_grpc, types_pb2

DEADLINE_S = 60


class DoormanProcess(ServedProcess):
    """`slm serve doorman` as a child process."""

    def __init__(self, settings: Settings, state: Path) -> None:
        super().__init__("doorman", state, lambda: to_toml(settings), DEADLINE_S)
        self.settings = settings

    @property
    def address(self) -> str:
        return self.settings.doorman.endpoint.address


@asynccontextmanager
async def ledger_running(settings: Settings) -> AsyncIterator[None]:
    registry = CollectorRegistry()
    endpoint = ServiceEndpoint(port=settings.ledger.endpoint.port, metrics_port=0)
    app = build_app(settings.ledger, runtime(settings, registry))
    async with GrpcService(
        "ledger", app, endpoint, settings.telemetry, registry, serve_metrics=False
    ):
        yield


async def ledger_records(settings: Settings) -> list[ledger_pb2.LedgerRecord]:
    async with grpc.aio.insecure_channel(settings.ledger.endpoint.address) as channel:
        stub = ledger_pb2_grpc.LedgerServiceStub(channel)
        return list((await stub.List(ledger_pb2.ListRequest(page_size=1000))).records)


@contextmanager
def silent_ledger() -> Iterator[str]:
    """An address that accepts TCP connections and never answers: a ledger that hangs."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        yield f"127.0.0.1:{listener.getsockname()[1]}"


def chat() -> doorman_pb2.ChatRequest:
    return doorman_pb2.ChatRequest(
        model=DEFAULT_MODEL,
        messages=[types_pb2.ChatMessage(role=types_pb2.ROLE_USER, content="Hi")],
        sampling=types_pb2.SamplingParams(max_tokens=3, seed=1),
    )


async def until_the_end(doorman: DoormanProcess, request_id: str) -> types_pb2.StreamEnd:
    """Stream a chat and return its final event the moment it arrives."""
    async with grpc.aio.insecure_channel(doorman.address) as channel:
        stub = doorman_pb2_grpc.DoormanServiceStub(channel)
        call = stub.Chat(chat(), metadata=(("x-request-id", request_id),), timeout=DEADLINE_S)
        async for response in call:
            if response.HasField("end"):
                call.cancel()  # the status after it is not waited for
                end: types_pb2.StreamEnd = response.end
                return end
    raise AssertionError("the stream ended without its final event")


@pytest.fixture
def settings(inference_server: GrpcService, tmp_path: Path) -> Settings:
    settings = mesh_settings(tmp_path)
    settings.doorman.inference_local = f"127.0.0.1:{inference_server.port}"
    return settings


async def test_an_acknowledged_record_survives_kill_9_of_the_doorman(
    settings: Settings, tmp_path: Path
) -> None:
    doorman = DoormanProcess(settings, tmp_path)
    async with ledger_running(settings):
        doorman.start()
        try:
            await doorman.wait_serving()
            end = await until_the_end(doorman, "killed-after-end")
            assert doorman.kill() == -signal.SIGKILL
        finally:
            doorman.stop()
        records = await ledger_records(settings)
    assert [r.entry.request_id for r in records] == ["killed-after-end"]
    entry = records[0].entry
    assert (entry.status_code, entry.finish_reason) == (0, end.finish_reason)
    assert entry.completion_tokens == end.usage.completion_tokens
    # Nothing was spooled: the ledger had it before the client had its end.
    assert not settings.doorman.ledger_spool.exists()


async def test_a_record_the_ledger_could_not_take_survives_kill_9_in_the_spool(
    settings: Settings, tmp_path: Path
) -> None:
    # fail_closed, and the ledger fails mid request (it hangs): the record goes to the spool
    # before the end, and the restarted Doorman delivers it before anything newer.
    assert settings.doorman.ledger_mode == "fail_closed"
    ledger_address = settings.doorman.ledger
    with silent_ledger() as hanging:
        settings.doorman.ledger = hanging
        doorman = DoormanProcess(settings, tmp_path)
        doorman.start()
        try:
            await doorman.wait_serving()
            end = await until_the_end(doorman, "spooled-then-killed")
            assert doorman.kill() == -signal.SIGKILL
        finally:
            doorman.stop()
    assert end.usage.completion_tokens > 0
    settings.doorman.ledger = ledger_address
    restarted = DoormanProcess(settings, tmp_path)
    async with ledger_running(settings):
        restarted.start()
        try:
            await restarted.wait_serving()
            # Its own record is durable before its end, and the spool goes before it.
            await until_the_end(restarted, "after-restart")
        finally:
            restarted.stop()
        records = await ledger_records(settings)
        verdict = await verify(settings)
    assert [r.entry.request_id for r in records] == ["spooled-then-killed", "after-restart"]
    assert records[0].entry.completion_tokens == end.usage.completion_tokens
    assert verdict.intact


async def verify(settings: Settings) -> ledger_pb2.VerifyResponse:
    async with grpc.aio.insecure_channel(settings.ledger.endpoint.address) as channel:
        verdict: ledger_pb2.VerifyResponse = await ledger_pb2_grpc.LedgerServiceStub(
            channel
        ).Verify(ledger_pb2.VerifyRequest())
    return verdict


async def test_a_failed_request_is_recorded_before_its_error_status(
    settings: Settings, tmp_path: Path
) -> None:
    doorman = DoormanProcess(settings, tmp_path)
    unknown = chat()
    unknown.model = "no-such-model"
    async with ledger_running(settings):
        doorman.start()
        try:
            await doorman.wait_serving()
            async with grpc.aio.insecure_channel(doorman.address) as channel:
                stub = doorman_pb2_grpc.DoormanServiceStub(channel)
                call = stub.Chat(unknown, metadata=(("x-request-id", "failed"),))
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    [r async for r in call]
            assert doorman.kill() == -signal.SIGKILL
        finally:
            doorman.stop()
        records = await ledger_records(settings)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert [(r.entry.request_id, r.entry.status_code) for r in records] == [
        ("failed", grpc.StatusCode.NOT_FOUND.value[0])
    ]
