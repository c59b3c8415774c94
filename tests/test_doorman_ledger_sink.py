"""The Doorman's ledger sink against a real ledger server that goes down and comes back."""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from helpers import DEFAULT_MODEL, free_port, mesh_settings, runtime
from prometheus_client import CollectorRegistry

from doorman.ledger_sink import Backoff, LedgerMode, LedgerSink, Spool
from ledger.app import build_app
from slm.config import ServiceEndpoint
from slm.errors import Internal, Unavailable, from_rpc_error
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
        async with self.running():
            return await self.request_ids_all()

    async def request_ids_all(self) -> list[str]:
        """Every record's request id in chain order, from the running ledger."""
        ids: list[str] = []
        request = ledger_pb2.ListRequest(page_size=1000)
        async with grpc.aio.insecure_channel(self.address) as channel:
            stub = ledger_pb2_grpc.LedgerServiceStub(channel)
            while True:
                page = await stub.List(request)
                ids += [r.entry.request_id for r in page.records]
                if not page.next_page_token:
                    return ids
                request.page_token = page.next_page_token


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
    spool = tmp_path / "spool"
    async with sink_for(ledger, "fail_closed", spool) as sink:
        async with ledger.running():
            await asyncio.wait_for(sink.commit(entry(1)), DEADLINE_S)  # acknowledged
            sink.admit()
        assert not spool.exists()
        # The ledger is gone. A request already running still ends: its record is fsync'd to
        # the spool before commit returns. New requests are refused.
        await asyncio.wait_for(sink.commit(entry(2)), DEADLINE_S)
        assert not sink.available
        assert spooled_ids(spool) == ["r2"]
        with pytest.raises(Unavailable) as refused:
            sink.admit()
        assert refused.value.retry_after_s is not None
        assert refused.value.reason == "LEDGER_UNAVAILABLE"
        await asyncio.wait_for(sink.commit(entry(3)), DEADLINE_S)
        assert spooled_ids(spool) == ["r2", "r3"]
        async with ledger.running():
            await asyncio.wait_for(sink.delivered(), DEADLINE_S)
            sink.admit()
            assert sink.available
    assert await ledger.request_ids() == ["r1", "r2", "r3"]
    assert spool.read_bytes() == b""


def spooled_ids(spool: Path) -> list[str]:
    return [
        ledger_pb2.LedgerEntry.FromString(base64.b64decode(line)).request_id
        for line in spool.read_bytes().splitlines()
    ]


async def test_spool_keeps_serving_and_replays_in_order(ledger: LedgerAt, tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    async with sink_for(ledger, "spool", spool) as sink:
        for i in range(5):
            await asyncio.wait_for(sink.commit(entry(i)), DEADLINE_S)
        sink.admit()  # serving goes on
        assert sink.backlog == 5
        assert spooled_ids(spool) == [f"r{i}" for i in range(5)]
        async with ledger.running():
            # Until the sink's next try the ledger counts as down: this one is spooled too, and
            # the spool is replayed in order.
            await asyncio.wait_for(sink.commit(entry(5)), DEADLINE_S)
            await asyncio.wait_for(sink.delivered(), DEADLINE_S)
            # The ledger is known to be back: the next record goes straight to it.
            await asyncio.wait_for(sink.commit(entry(6)), DEADLINE_S)
            assert sink.backlog == 0
    assert await ledger.request_ids() == [f"r{i}" for i in range(7)]
    assert spool.read_bytes() == b""


async def test_a_committed_record_survives_a_doorman_crash(
    ledger: LedgerAt, tmp_path: Path
) -> None:
    spool = tmp_path / "spool"
    # The first Doorman never shuts down: only what commit made durable can survive.
    async with sink_for(ledger, "spool", spool, drain=False) as crashed:
        for i in range(3):
            await asyncio.wait_for(crashed.commit(entry(i)), DEADLINE_S)
    async with ledger.running(), sink_for(ledger, "fail_closed", spool) as restarted:
        await asyncio.wait_for(restarted.commit(entry(3)), DEADLINE_S)
    assert await ledger.request_ids() == ["r0", "r1", "r2", "r3"]


async def test_fail_closed_spools_what_it_holds_at_shutdown(
    ledger: LedgerAt, tmp_path: Path
) -> None:
    spool = tmp_path / "spool"
    async with sink_for(ledger, "fail_closed", spool) as sink:
        sink.submit(entry(1))  # nobody waits for it: a request whose client went away
        await asyncio.wait_for(sink.settled(), DEADLINE_S)
        assert not sink.available
    assert spooled_ids(spool) == ["r1"]
    async with ledger.running(), sink_for(ledger, "fail_closed", spool) as restarted:
        await asyncio.wait_for(restarted.delivered(), DEADLINE_S)
    assert await ledger.request_ids() == ["r1"]


class CountCalls(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    """Counts the RPCs a channel makes, by method name."""

    def __init__(self) -> None:
        self.calls: collections.Counter[str] = collections.Counter()

    async def intercept_unary_unary(
        self, continuation: Any, client_call_details: Any, request: Any
    ) -> Any:
        method = client_call_details.method
        name = method.decode() if isinstance(method, bytes) else str(method)
        self.calls[name.rsplit("/", 1)[-1]] += 1
        return await continuation(client_call_details, request)


async def test_concurrent_commits_go_in_one_batch_and_keep_the_chain(
    ledger: LedgerAt, tmp_path: Path
) -> None:
    counter = CountCalls()
    async with (
        ledger.running(),
        grpc.aio.insecure_channel(ledger.address, interceptors=[counter]) as channel,
    ):
        sink = LedgerSink(
            ledger_pb2_grpc.LedgerServiceStub(channel),
            "fail_closed",
            tmp_path / "spool",
            CollectorRegistry(),
        )
        await sink.start()
        try:
            # All 40 are held before the worker runs: one AppendBatch takes them all.
            await asyncio.wait_for(
                asyncio.gather(*(sink.commit(entry(i)) for i in range(40))), DEADLINE_S
            )
            assert (counter.calls["AppendBatch"], counter.calls["Append"]) == (1, 0)

            # 16 requests at a time, each committing as soon as its last one is durable: the
            # batches interleave, and the chain stays one chain.
            async def requests(worker: int) -> None:
                for i in range(10):
                    await sink.commit(entry(1000 + 100 * worker + i))

            await asyncio.wait_for(asyncio.gather(*(requests(w) for w in range(16))), DEADLINE_S)
            verdict = await ledger_pb2_grpc.LedgerServiceStub(channel).Verify(
                ledger_pb2.VerifyRequest()
            )
            ids = await ledger.request_ids_all()
        finally:
            await sink.drain(timeout_s=5)
    assert (verdict.intact, verdict.records_checked) == (True, 200)
    expected = [f"r{i}" for i in range(40)]
    expected += [f"r{1000 + 100 * w + i}" for w in range(16) for i in range(10)]
    assert sorted(ids) == sorted(expected)
    # Each request's records are in the order it committed them.
    for w in range(16):
        theirs = [f"r{1000 + 100 * w + i}" for i in range(10)]
        assert [i for i in ids if i in theirs] == theirs
    # Fewer calls than records: concurrent records shared batches.
    assert counter.calls["AppendBatch"] + counter.calls["Append"] < 200


async def test_a_record_the_ledger_refuses_fails_only_its_own_commit(
    ledger: LedgerAt, tmp_path: Path
) -> None:
    async with ledger.running(), sink_for(ledger, "fail_closed", tmp_path / "spool") as sink:
        nameless = ledger_pb2.LedgerEntry(model="m")  # the ledger refuses a record without id
        results = await asyncio.wait_for(
            asyncio.gather(
                sink.commit(entry(1)),
                sink.commit(nameless),
                sink.commit(entry(2)),
                return_exceptions=True,
            ),
            DEADLINE_S,
        )
        sink.admit()  # a refused record is no outage
    assert results[0] is None
    assert results[2] is None
    assert isinstance(results[1], Internal)
    assert await ledger.request_ids() == ["r1", "r2"]


async def test_commit_fails_when_neither_ledger_nor_spool_can_keep_the_record(
    ledger: LedgerAt, tmp_path: Path
) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    async with sink_for(ledger, "spool", blocker / "spool") as sink:
        with pytest.raises(Unavailable) as caught:
            await asyncio.wait_for(sink.commit(entry(1)), DEADLINE_S)
        assert caught.value.reason == "LEDGER_UNAVAILABLE"
        with pytest.raises(Unavailable):
            sink.admit()  # and new requests are refused, in spool mode too
        assert sink.backlog == 0  # dropped: its request failed, nobody was told otherwise


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
