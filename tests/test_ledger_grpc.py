"""LedgerService through real stubs: in-process on port 0, and as a real process that is
killed with SIGKILL between an acknowledged Append and a restart (SQLite and PostgreSQL)."""

from __future__ import annotations

import asyncio
import csv
import io
import os
import signal
import sqlite3
import sys
from pathlib import Path

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from helpers import ServedProcess, free_port, mesh_settings
from postgres_server import PostgresServer

from mesh.settings import Settings
from slm.errors import from_rpc_error
from slm.server import GrpcService
from slm.v1 import ledger_pb2, ledger_pb2_grpc, types_pb2


def address(service: GrpcService) -> str:
    return f"127.0.0.1:{service.port}"


def stamp(unix_ns: int) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(unix_ns)
    return ts


def entry(n: int, tenant: str = "acme") -> ledger_pb2.LedgerEntry:
    return ledger_pb2.LedgerEntry(
        request_id=f"r{n}",
        time=stamp(1_700_000_000_000_000_000 + n),
        tenant=tenant,
        model="m",
        tier=types_pb2.TIER_LOCAL,
        prompt_tokens=n,
    )


async def test_routing_and_policy_fields_round_trip(ledger_server: GrpcService) -> None:
    full = ledger_pb2.LedgerEntry(
        request_id="routed",
        time=stamp(1),
        key_id="key-7",
        adapter="legal-lora",
        hops=[
            types_pb2.RouteHop(model="router", tier=types_pb2.TIER_LOCAL, intent="legal"),
            types_pb2.RouteHop(model="legal", tier=types_pb2.TIER_LOCAL, upstream="x:1"),
        ],
        entity_counts={"EMAIL_ADDRESS": 2},
        policy_decisions=["fallback:TIER_LOCAL"],
        tools_offered=["get_weather", "send_mail"],
        tool_calls=["send_mail"],
        constraint="json_schema",
    )
    async with grpc.aio.insecure_channel(address(ledger_server)) as channel:
        ledger = ledger_pb2_grpc.LedgerServiceStub(channel)
        appended = (await ledger.Append(ledger_pb2.AppendRequest(entry=full))).record
        listed = (await ledger.List(ledger_pb2.ListRequest())).records
    assert appended.entry == full
    assert list(listed) == [appended]


async def test_list_filters_and_pages(ledger_server: GrpcService) -> None:
    async with grpc.aio.insecure_channel(address(ledger_server)) as channel:
        ledger = ledger_pb2_grpc.LedgerServiceStub(channel)
        for i in range(10):
            await ledger.Append(
                ledger_pb2.AppendRequest(entry=entry(i, "acme" if i % 2 else "globex"))
            )
        request = ledger_pb2.ListRequest(
            page_size=2,
            tenant="acme",
            start_time=stamp(1_700_000_000_000_000_000 + 3),
            end_time=stamp(1_700_000_000_000_000_000 + 9),
        )
        seen: list[str] = []
        while True:
            page = await ledger.List(request)
            seen += [r.entry.request_id for r in page.records]
            if not page.next_page_token:
                break
            request.page_token = page.next_page_token
        assert seen == ["r3", "r5", "r7"]
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await ledger.List(ledger_pb2.ListRequest(start_time=stamp(10), end_time=stamp(5)))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_append_batch_and_newest_first_list(ledger_server: GrpcService) -> None:
    async with grpc.aio.insecure_channel(address(ledger_server)) as channel:
        ledger = ledger_pb2_grpc.LedgerServiceStub(channel)
        first = (await ledger.Append(ledger_pb2.AppendRequest(entry=entry(0)))).record
        batch = (
            await ledger.AppendBatch(
                ledger_pb2.AppendBatchRequest(entries=[entry(i) for i in range(1, 6)])
            )
        ).records
        newest = ledger_pb2.ListRequest(page_size=4, order=ledger_pb2.LIST_ORDER_NEWEST_FIRST)
        tail = await ledger.List(newest)
        newest.page_token = tail.next_page_token
        rest = await ledger.List(newest)
        with pytest.raises(grpc.aio.AioRpcError) as nameless:
            await ledger.AppendBatch(
                ledger_pb2.AppendBatchRequest(entries=[entry(6), ledger_pb2.LedgerEntry()])
            )
        with pytest.raises(grpc.aio.AioRpcError) as unknown:
            await ledger.List(ledger_pb2.ListRequest(order=7))  # type: ignore[arg-type]
        verdict = await ledger.Verify(ledger_pb2.VerifyRequest())
    assert [r.entry.request_id for r in batch] == [f"r{i}" for i in range(1, 6)]
    assert [r.sequence for r in batch] == [2, 3, 4, 5, 6]
    assert batch[0].prev_hash == first.hash
    assert [r.sequence for r in tail.records] == [6, 5, 4, 3]
    assert [r.sequence for r in rest.records] == [2, 1]
    assert rest.next_page_token == ""
    assert nameless.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert from_rpc_error(nameless.value).field == "entries[1].request_id"
    assert unknown.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert from_rpc_error(unknown.value).field == "order"
    # The refused batch added nothing.
    assert (verdict.intact, verdict.records_checked) == (True, 6)


async def test_verify_and_export_csv(ledger_server: GrpcService) -> None:
    async with grpc.aio.insecure_channel(address(ledger_server)) as channel:
        ledger = ledger_pb2_grpc.LedgerServiceStub(channel)
        empty = await ledger.Verify(ledger_pb2.VerifyRequest())
        assert (empty.intact, empty.records_checked, empty.head_hash) == (True, 0, "")
        last = None
        for i in range(3):
            last = (await ledger.Append(ledger_pb2.AppendRequest(entry=entry(i)))).record
        verdict = await ledger.Verify(ledger_pb2.VerifyRequest())
        assert last is not None
        assert (verdict.intact, verdict.records_checked, verdict.head_sequence) == (True, 3, 3)
        assert verdict.head_hash == last.hash
        assert not verdict.HasField("first_break")
        chunks = [
            response.chunk
            async for response in ledger.ExportCsv(ledger_pb2.ExportCsvRequest(tenant="acme"))
        ]
    rows = list(csv.DictReader(io.StringIO(b"".join(chunks).decode())))
    assert [(r["sequence"], r["request_id"], r["hash"]) for r in rows[-1:]] == [
        ("3", "r2", last.hash)
    ]
    assert len(rows) == 3


# --- durability: a real ledger process, SIGKILL, restart ---------------------------------


class LedgerProcess(ServedProcess):
    """`slm serve ledger` as a child process."""

    def __init__(self, settings: Settings, state: Path) -> None:
        super().__init__("ledger", state, lambda: ledger_toml(settings))
        self.settings = settings

    @property
    def address(self) -> str:
        return self.settings.ledger.endpoint.address


def ledger_toml(settings: Settings) -> str:
    """Only the ledger's own section: everything else keeps its default."""
    ledger = settings.ledger
    return (
        "[ledger]\n"
        f'backend = "{ledger.backend}"\n'
        f'database = "{ledger.database}"\n'
        f'postgres_dsn = "{ledger.postgres_dsn}"\n'
        "[ledger.endpoint]\n"
        f"port = {ledger.endpoint.port}\n"
        f"metrics_port = {ledger.endpoint.metrics_port}\n"
    )


@pytest.fixture(params=["sqlite", "postgresql"])
async def ledger_settings(request: pytest.FixtureRequest, tmp_path: Path) -> Settings:
    settings = mesh_settings(tmp_path)
    if request.param == "postgresql":
        server: PostgresServer = request.getfixturevalue("postgres")
        settings.ledger.backend = "postgresql"
        settings.ledger.postgres_dsn = await server.new_database()
    return settings


async def test_an_acknowledged_record_survives_kill_9(
    ledger_settings: Settings, tmp_path: Path
) -> None:
    ledger = LedgerProcess(ledger_settings, tmp_path)
    ledger.start()
    try:
        async with grpc.aio.insecure_channel(ledger.address) as channel:
            await ledger.wait_serving()
            stub = ledger_pb2_grpc.LedgerServiceStub(channel)
            acknowledged = [
                (await stub.Append(ledger_pb2.AppendRequest(entry=entry(i)))).record
                for i in range(20)
            ]
        # No graceful shutdown, no chance to flush anything: only what was durable survives.
        assert ledger.kill() == -signal.SIGKILL
        ledger.start()
        async with grpc.aio.insecure_channel(ledger.address) as channel:
            await ledger.wait_serving()
            stub = ledger_pb2_grpc.LedgerServiceStub(channel)
            listed = (await stub.List(ledger_pb2.ListRequest())).records
            verdict = await stub.Verify(ledger_pb2.VerifyRequest())
            after = (await stub.Append(ledger_pb2.AppendRequest(entry=entry(20)))).record
    finally:
        ledger.stop()
    assert list(listed) == acknowledged
    assert (verdict.intact, verdict.records_checked) == (True, 20)
    assert (after.sequence, after.prev_hash) == (21, acknowledged[-1].hash)


# --- the CLI: `slm ledger verify|export` against a real server ---------------------------


async def slm(*args: str) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "mesh.cli",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "SLM_CONFIG": ""},
    )
    out, _ = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode()


async def test_cli_verifies_exports_and_names_a_tampered_record(
    ledger_server: GrpcService, tmp_path: Path
) -> None:
    target = address(ledger_server)
    async with grpc.aio.insecure_channel(target) as channel:
        ledger = ledger_pb2_grpc.LedgerServiceStub(channel)
        for i in range(4):
            await ledger.Append(ledger_pb2.AppendRequest(entry=entry(i, "acme" if i else "x")))
    code, out = await slm("ledger", "verify", "--address", target)
    assert (code, out.split(",")[0]) == (0, "intact: 4 records")
    csv_path = tmp_path / "out.csv"
    since = "2023-11-14T22:13:20.000000001+00:00"  # excludes r0 by time as well as by tenant
    code, out = await slm(
        "ledger", "export", "--address", target, "--tenant", "acme", "--since", since,
        "-o", str(csv_path),
    )  # fmt: skip
    assert code == 0, out
    rows = list(csv.DictReader(io.StringIO(csv_path.read_text())))
    assert [r["request_id"] for r in rows] == ["r1", "r2", "r3"]
    # The fixture's ledger database: edit record 2 behind the triggers' back.
    db = sqlite3.connect(tmp_path / "ledger.sqlite3", isolation_level=None)
    db.execute("DROP TRIGGER records_no_update")
    db.execute("UPDATE records SET body = replace(body, '\"r1\"', '\"r9\"') WHERE sequence = 2")
    db.close()
    code, out = await slm("ledger", "verify", "--address", target)
    assert code == 1
    assert out.startswith("BROKEN at record 2: HASH_MISMATCH")
    code, out = await slm("ledger", "verify", "--address", f"127.0.0.1:{free_port()}")
    assert code == 2
