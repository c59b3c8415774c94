"""The Doorman's ledger sink against a real ledger server that goes down and comes back."""

from __future__ import annotations

import asyncio
import base64
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from helpers import DEFAULT_MODEL, free_port, mesh_settings, runtime
from prometheus_client import CollectorRegistry

from doorman.ledger_sink import Backoff, LedgerMode, LedgerSink, Spool
from ledger.app import build_app
from slm.config import ServiceEndpoint
from slm.errors import Unavailable, from_rpc_error
from slm.server import GrpcService
from slm.v1 import doorman_pb2, doorman_pb2_grpc, ledger_pb2, ledger_pb2_grpc, types_pb2

# The sink retries fast; the channel must reconnect as fast to notice the ledger is back.
FAST_RECONNECT = (
    ("grpc.initial_reconnect_backoff_ms", 50),
    ("grpc.min_reconnect_backoff_ms", 50),
    ("grpc.max_reconnect_backoff_ms", 200),
)
DEADLINE_S = 30


def entry(n: int) -> ledger_pb2.LedgerEntry:
    now = Timestamp()
    now.GetCurrentTime()
    return ledger_pb2.LedgerEntry(request_id=f"r{n}", time=now, tenant="acme", model="m")


class LedgerAt:
    """A ledger server that can be stopped and started again on the same port and database."""

    def __init__(self, state: Path) -> None:
        self.settings = mesh_settings(state)
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"

    @asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        registry = CollectorRegistry()
        endpoint = ServiceEndpoint(port=self.port, metrics_port=0)
        app = build_app(self.settings.ledger, runtime(self.settings, registry))
        async with GrpcService(
            "ledger", app, endpoint, self.settings.telemetry, registry, serve_metrics=False
        ):
            yield

    async def request_ids(self) -> list[str]:
        async with self.running(), grpc.aio.insecure_channel(self.address) as channel:
            page = await ledger_pb2_grpc.LedgerServiceStub(channel).List(ledger_pb2.ListRequest())
        return [r.entry.request_id for r in page.records]


@pytest.fixture
def ledger(tmp_path: Path) -> LedgerAt:
    return LedgerAt(tmp_path / "ledger")


@asynccontextmanager
async def sink_for(
    ledger: LedgerAt, mode: LedgerMode, spool: Path, drain: bool = True
) -> AsyncIterator[LedgerSink]:
    async with grpc.aio.insecure_channel(ledger.address, options=FAST_RECONNECT) as channel:
        sink = LedgerSink(
            ledger_pb2_grpc.LedgerServiceStub(channel),
            mode,
            spool,
            CollectorRegistry(),
            backoff=Backoff(initial_s=0.05, max_s=0.2),
            append_timeout_s=2,
        )
        await sink.start()
        try:
            yield sink
        finally:
            if drain:
                await sink.drain(timeout_s=5)
            else:
                # A crash: the worker stops where it is; nothing is delivered or spooled now.
                assert sink._worker is not None
                sink._worker.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await sink._worker


async def test_fail_closed_refuses_while_the_ledger_is_down(
    ledger: LedgerAt, tmp_path: Path
) -> None:
    async with sink_for(ledger, "fail_closed", tmp_path / "spool") as sink:
        async with ledger.running():
            sink.submit(entry(1))
            await asyncio.wait_for(sink.delivered(), DEADLINE_S)
            sink.admit()
        # The ledger is gone; the next record cannot be delivered and new requests are refused.
        sink.submit(entry(2))
        await asyncio.wait_for(sink.settled(), DEADLINE_S)
        assert not sink.available
        with pytest.raises(Unavailable) as refused:
            sink.admit()
        assert refused.value.retry_after_s is not None
        assert refused.value.reason == "LEDGER_UNAVAILABLE"
        sink.submit(entry(3))  # a request that was already running when the ledger went down
        async with ledger.running():
            await asyncio.wait_for(sink.delivered(), DEADLINE_S)
            sink.admit()
            assert sink.available
    assert await ledger.request_ids() == ["r1", "r2", "r3"]
    assert not (tmp_path / "spool").exists()


async def test_spool_keeps_serving_and_replays_in_order(ledger: LedgerAt, tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    async with sink_for(ledger, "spool", spool) as sink:
        for i in range(5):
            sink.submit(entry(i))
        await asyncio.wait_for(sink.settled(), DEADLINE_S)
        sink.admit()  # serving goes on
        assert sink.backlog == 5
        assert len(spool.read_bytes().splitlines()) == 5
        async with ledger.running():
            await asyncio.wait_for(sink.delivered(), DEADLINE_S)
            sink.submit(entry(5))
            await asyncio.wait_for(sink.delivered(), DEADLINE_S)
    assert await ledger.request_ids() == [f"r{i}" for i in range(6)]
    assert spool.read_bytes() == b""


async def test_a_spooled_record_survives_a_doorman_crash(ledger: LedgerAt, tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    # The first Doorman never shuts down: only what reached the spool file can survive.
    async with sink_for(ledger, "spool", spool, drain=False) as crashed:
        for i in range(3):
            crashed.submit(entry(i))
        await asyncio.wait_for(crashed.settled(), DEADLINE_S)
    async with ledger.running(), sink_for(ledger, "fail_closed", spool) as restarted:
        restarted.submit(entry(3))
        await asyncio.wait_for(restarted.delivered(), DEADLINE_S)
    assert await ledger.request_ids() == ["r0", "r1", "r2", "r3"]


async def test_fail_closed_spools_what_it_holds_at_shutdown(
    ledger: LedgerAt, tmp_path: Path
) -> None:
    spool = tmp_path / "spool"
    async with sink_for(ledger, "fail_closed", spool) as sink:
        sink.submit(entry(1))
        await asyncio.wait_for(sink.settled(), DEADLINE_S)
        assert not sink.available
    assert len(spool.read_bytes().splitlines()) == 1
    async with ledger.running(), sink_for(ledger, "fail_closed", spool) as restarted:
        await asyncio.wait_for(restarted.delivered(), DEADLINE_S)
    assert await ledger.request_ids() == ["r1"]


def test_spool_cuts_a_torn_last_record_and_resumes_at_its_offset(tmp_path: Path) -> None:
    path = tmp_path / "spool"
    first = Spool(path)
    first.append([entry(1), entry(2), entry(3)])
    first.advance()  # r1 reached the ledger
    with path.open("ab") as spool:
        spool.write(base64.b64encode(entry(4).SerializeToString())[:10])  # crash mid-write
    again = Spool(path)
    again.load()
    assert [e.request_id for e, _ in again.pending] == ["r2", "r3"]
    again.append([entry(5)])
    reread = Spool(path)
    reread.load()
    assert [e.request_id for e, _ in reread.pending] == ["r2", "r3", "r5"]


def test_an_unreadable_spool_line_is_skipped(tmp_path: Path) -> None:
    path = tmp_path / "spool"
    first = Spool(path)
    first.append([entry(1)])
    with path.open("ab") as spool:
        spool.write(b"not base64 at all!\n")
    first.append([entry(2)])
    again = Spool(path)
    again.load()
    assert [e.request_id for e, _ in again.pending] == ["r1", "r2"]
    again.advance()
    again.advance()
    assert path.read_bytes() == b""


# --- through the Doorman: a real engine, no ledger -------------------------------------


async def test_the_doorman_refuses_requests_while_the_ledger_is_down(
    inference_server: GrpcService, tmp_path: Path
) -> None:
    from doorman.app import build_app as build_doorman

    settings = mesh_settings(tmp_path)
    settings.doorman.inference_local = f"127.0.0.1:{inference_server.port}"
    settings.doorman.ledger = f"127.0.0.1:{free_port()}"  # nothing listens there
    registry = CollectorRegistry()
    endpoint = ServiceEndpoint(port=0, metrics_port=0)
    request = doorman_pb2.ChatRequest(
        model=DEFAULT_MODEL,
        messages=[types_pb2.ChatMessage(role=types_pb2.ROLE_USER, content="Hi")],
        sampling=types_pb2.SamplingParams(max_tokens=2, seed=1),
    )
    app = build_doorman(settings.doorman, runtime(settings, registry))
    async with (
        GrpcService("doorman", app, endpoint, settings.telemetry, registry) as service,
        grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as channel,
    ):
        stub = doorman_pb2_grpc.DoormanServiceStub(channel)
        # Served: the Doorman learns the ledger is down only when the record cannot be written.
        first = [r async for r in stub.Chat(request)]
        assert first[-1].HasField("end")
        await asyncio.wait_for(app.doorman._ledger.settled(), DEADLINE_S)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            [r async for r in stub.Chat(request)]
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    error = from_rpc_error(caught.value)
    assert (error.reason, error.retry_after_s is not None) == ("LEDGER_UNAVAILABLE", True)
    # Shutdown kept the undelivered record: it waits in the spool for the ledger.
    assert len(settings.doorman.ledger_spool.read_bytes().splitlines()) == 1
