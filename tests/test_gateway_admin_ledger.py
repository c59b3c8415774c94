"""/admin/ledger over HTTP, through the gateway app, against a real ledger server."""

from __future__ import annotations

import csv
import hashlib
import io
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import httpx
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from helpers import free_port, gateway_settings, mesh_settings

from gateway.app import build_app
from mesh.settings import Settings
from slm.server import GrpcService
from slm.v1 import ledger_pb2, ledger_pb2_grpc

KEY = "admin-s3cret"
AUTH = {"authorization": f"Bearer {KEY}"}
BASE_NS = 1_700_000_000_000_000_000  # 2023-11-14T22:13:20Z


def settings_for(tmp_path: Path, ledger_address: str) -> Settings:
    settings = mesh_settings(tmp_path / "gateway")
    settings.gateway.ledger = ledger_address
    settings.gateway.admin_key_sha256 = hashlib.sha256(KEY.encode()).hexdigest()
    return settings


@asynccontextmanager
async def client_for(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    app = build_app(gateway_settings(settings))
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://gw") as client,
    ):
        yield client


@pytest.fixture
async def client(ledger_server: GrpcService, tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    address = f"127.0.0.1:{ledger_server.port}"
    async with grpc.aio.insecure_channel(address) as channel:
        stub = ledger_pb2_grpc.LedgerServiceStub(channel)
        for i in range(5):
            time = Timestamp()
            time.FromNanoseconds(BASE_NS + i * 1_000_000_000)
            entry = ledger_pb2.LedgerEntry(
                request_id=f"r{i}", time=time, tenant="acme" if i % 2 else "globex", model="m"
            )
            await stub.Append(ledger_pb2.AppendRequest(entry=entry))
    async with client_for(settings_for(tmp_path, address)) as c:
        yield c


async def test_records_are_filtered_and_paged(client: httpx.AsyncClient) -> None:
    params = {"tenant": "globex", "since": "2023-11-14T22:13:21Z", "page_size": "1"}
    first = await client.get("/admin/ledger/records", params=params, headers=AUTH)
    assert first.status_code == 200, first.text
    body = first.json()
    assert [(r["sequence"], r["entry"]["request_id"]) for r in body["data"]] == [(3, "r2")]
    assert body["data"][0]["entry"]["time"] == "2023-11-14T22:13:22Z"
    params["page_token"] = body["next_page_token"]
    rest = (await client.get("/admin/ledger/records", params=params, headers=AUTH)).json()
    assert [r["entry"]["request_id"] for r in rest["data"]] == ["r4"]
    assert rest["next_page_token"] == ""


async def test_bad_parameters_are_400_in_openai_shape(client: httpx.AsyncClient) -> None:
    bad_time = await client.get("/admin/ledger/records?since=yesterday", headers=AUTH)
    assert bad_time.status_code == 400
    assert bad_time.json()["error"]["param"] == "since"
    inverted = await client.get(
        "/admin/ledger/export.csv?since=2024-01-02T00:00:00Z&until=2024-01-01T00:00:00Z",
        headers=AUTH,
    )
    assert inverted.status_code == 400
    too_big = await client.get("/admin/ledger/records?page_size=5000", headers=AUTH)
    assert too_big.status_code == 400


async def test_every_route_needs_the_admin_key(client: httpx.AsyncClient) -> None:
    for path in ("/records", "/verify", "/export.csv"):
        missing = await client.get(f"/admin/ledger{path}")
        wrong = await client.get(f"/admin/ledger{path}", headers={"authorization": "Bearer x"})
        assert (missing.status_code, wrong.status_code) == (401, 403)


async def test_export_streams_csv(client: httpx.AsyncClient) -> None:
    response = await client.get("/admin/ledger/export.csv?tenant=acme", headers=AUTH)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(response.text)))
    assert [r["request_id"] for r in rows] == ["r1", "r3"]


async def test_verify_names_a_tampered_record(client: httpx.AsyncClient, tmp_path: Path) -> None:
    intact = (await client.get("/admin/ledger/verify", headers=AUTH)).json()
    assert (intact["intact"], intact["records_checked"], intact["first_break"]) == (True, 5, None)
    # The ledger_server fixture's database, edited behind the triggers' back.
    db = sqlite3.connect(tmp_path / "ledger.sqlite3", isolation_level=None)
    db.execute("DROP TRIGGER records_no_update")
    db.execute("UPDATE records SET hash = 'forged' WHERE sequence = 4")
    db.close()
    broken = (await client.get("/admin/ledger/verify", headers=AUTH)).json()
    assert broken["intact"] is False
    assert broken["first_break"]["sequence"] == 4
    assert broken["first_break"]["reason"] == "CHAIN_BREAK_REASON_HASH_MISMATCH"
    assert broken["head_sequence"] == 3


async def test_a_ledger_that_is_down_is_503(tmp_path: Path) -> None:
    async with client_for(settings_for(tmp_path, f"127.0.0.1:{free_port()}")) as client:
        response = await client.get("/admin/ledger/verify", headers=AUTH)
        assert response.status_code == 503
        exported = await client.get("/admin/ledger/export.csv", headers=AUTH)
        assert exported.status_code == 503


async def test_newest_first_is_the_chain_tail_past_the_first_page(
    client: httpx.AsyncClient, ledger_server: GrpcService
) -> None:
    # 5 records from the fixture, then more than a default page (100) of new ones: the first
    # newest-first page must be the tail, not the tail of an oldest-first page.
    async with grpc.aio.insecure_channel(f"127.0.0.1:{ledger_server.port}") as channel:
        stub = ledger_pb2_grpc.LedgerServiceStub(channel)
        entries = [
            ledger_pb2.LedgerEntry(request_id=f"n{i}", tenant="acme", model="m") for i in range(150)
        ]
        await stub.AppendBatch(ledger_pb2.AppendBatchRequest(entries=entries))
    params = {"order": "newest_first", "page_size": "20"}
    first = await client.get("/admin/ledger/records", params=params, headers=AUTH)
    assert first.status_code == 200, first.text
    page = first.json()
    assert [r["sequence"] for r in page["data"]] == list(range(155, 135, -1))
    assert page["data"][0]["entry"]["request_id"] == "n149"
    params["page_token"] = page["next_page_token"]
    second = (await client.get("/admin/ledger/records", params=params, headers=AUTH)).json()
    assert [r["sequence"] for r in second["data"]] == list(range(135, 115, -1))
    oldest = (await client.get("/admin/ledger/records", headers=AUTH)).json()
    assert [r["sequence"] for r in oldest["data"]] == list(range(1, 101))


async def test_an_order_or_page_size_out_of_range_is_400_naming_it(
    client: httpx.AsyncClient,
) -> None:
    for query, param in (
        ("order=sideways", "order"),
        ("page_size=1837098970879", "page_size"),
        ("page_size=-1", "page_size"),
        ("since=0001-01-01T00:00:00%2B01:00", "since"),
    ):
        response = await client.get(f"/admin/ledger/records?{query}", headers=AUTH)
        assert response.status_code == 400, (query, response.text)
        assert response.json()["error"]["param"] == param, query
