"""The ledger core on each backend (SQLite, a real PostgreSQL): chain, paging, filters,
append-only, verification of tampered rows, CSV export, restart."""

from __future__ import annotations

import asyncio
import csv
import io
import itertools
import json
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest
from postgres_server import PostgresServer

from ledger.csv_export import COLUMNS, csv_chunks
from ledger.postgres import PostgresBackend
from ledger.sqlite import SqliteBackend
from ledger.store import (
    MAX_BATCH,
    Backend,
    BreakReason,
    Entry,
    Hop,
    LedgerStore,
    Query,
    Row,
    Seal,
    canonical,
    chain_hash,
)
from slm.errors import InvalidArgument

BACKENDS = ["sqlite", "postgresql"]


def entry(n: int, tenant: str = "acme", time_ns: int | None = None) -> Entry:
    return Entry(
        request_id=f"req-{n}",
        time_unix_ns=time_ns if time_ns is not None else 1_700_000_000_000_000_000 + n,
        tenant=tenant,
        model="m",
        prompt_tokens=n,
    )


@dataclass
class Storage:
    """A backend plus the test's own raw access to its table, bypassing the store."""

    make: Callable[[], Backend]
    # Runs SQL on the test's own connection ("?" placeholders), past the append-only triggers
    # when bypass is true.
    raw: Callable[[str, tuple[object, ...], bool], Awaitable[None]]
    # The error the database raises when a trigger refuses a change.
    refused: type[Exception]

    async def tamper(self, sql: str, *args: object) -> None:
        await self.raw(sql, args, True)


@pytest.fixture(params=BACKENDS)
async def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    if request.param == "sqlite":
        path = tmp_path / "ledger.sqlite3"

        async def raw_sqlite(sql: str, args: tuple[object, ...], bypass: bool) -> None:
            db = sqlite3.connect(path, isolation_level=None)
            try:
                db.execute("BEGIN IMMEDIATE")
                triggers = db.execute(
                    "SELECT name, sql FROM sqlite_master WHERE type = 'trigger'"
                ).fetchall()
                if bypass:
                    # Dropped and recreated inside this one transaction of the test's own.
                    for name, _ in triggers:
                        db.execute(f"DROP TRIGGER {name}")
                try:
                    db.execute(sql, args)
                finally:
                    if bypass:
                        for _, create in triggers:
                            db.execute(create)
                db.execute("COMMIT")
            finally:
                db.close()

        return Storage(lambda: SqliteBackend(path), raw_sqlite, sqlite3.IntegrityError)

    server: PostgresServer = request.getfixturevalue("postgres")
    dsn = await server.new_database()

    async def raw_postgres(sql: str, args: tuple[object, ...], bypass: bool) -> None:
        numbered = sql
        for i in range(len(args)):
            numbered = numbered.replace("?", f"${i + 1}", 1)
        db = await asyncpg.connect(dsn)
        try:
            async with db.transaction():
                if bypass:
                    # Disabled inside this one transaction of the test's own.
                    await db.execute("ALTER TABLE records DISABLE TRIGGER USER")
                await db.execute(numbered, *args)
                if bypass:
                    await db.execute("ALTER TABLE records ENABLE TRIGGER USER")
        finally:
            await db.close()

    return Storage(lambda: PostgresBackend(dsn), raw_postgres, asyncpg.RaiseError)


@pytest.fixture
async def store(storage: Storage) -> AsyncIterator[LedgerStore]:
    s = LedgerStore(storage.make())
    await s.open()
    yield s
    await s.close()


async def test_each_record_holds_the_hash_of_the_previous(store: LedgerStore) -> None:
    records = [await store.append(entry(i)) for i in range(5)]
    assert records[0].prev_hash == ""
    for prev, cur in itertools.pairwise(records):
        assert cur.prev_hash == prev.hash
        assert cur.sequence == prev.sequence + 1
    # Anyone can re-derive a hash from the stored canonical body.
    last = records[-1]
    assert last.hash == chain_hash(last.prev_hash, canonical(last.sequence, last.entry))
    assert (await store.list(0, "")).records == records


async def test_chain_continues_after_reopen(storage: Storage) -> None:
    first = LedgerStore(storage.make())
    await first.open()
    a = await first.append(entry(1))
    await first.close()
    second = LedgerStore(storage.make())
    await second.open()
    b = await second.append(entry(2))
    await second.close()
    assert (b.sequence, b.prev_hash) == (a.sequence + 1, a.hash)


async def test_two_stores_on_one_database_extend_one_chain(storage: Storage) -> None:
    # Two ledger replicas (or processes) sharing the storage must not fork the chain.
    a, b = LedgerStore(storage.make()), LedgerStore(storage.make())
    await a.open()
    await b.open()
    for i in range(6):
        await (a if i % 2 else b).append(entry(i))
    verdict = await a.verify()
    await a.close()
    await b.close()
    assert verdict.intact
    assert verdict.records_checked == 6


async def test_paging_walks_every_record_once(store: LedgerStore) -> None:
    for i in range(7):
        await store.append(entry(i))
    seen: list[int] = []
    token = ""
    while True:
        page = await store.list(3, token)
        seen += [r.sequence for r in page.records]
        if not page.next_page_token:
            break
        token = page.next_page_token
    assert seen == list(range(1, 8))


async def test_list_filters_by_tenant_and_time_range(store: LedgerStore) -> None:
    for i in range(12):
        await store.append(entry(i, tenant="acme" if i % 3 else "globex", time_ns=1000 + i))
    acme = await store.list(0, "", Query(tenant="acme"))
    assert [r.entry.request_id for r in acme.records] == [f"req-{i}" for i in range(12) if i % 3]
    window = await store.list(0, "", Query(since_ns=1003, until_ns=1007))
    assert [r.entry.time_unix_ns for r in window.records] == [1003, 1004, 1005, 1006]
    both = await store.list(0, "", Query(tenant="globex", since_ns=1003, until_ns=1010))
    assert [r.entry.request_id for r in both.records] == ["req-3", "req-6", "req-9"]
    # Filtered paging: the token continues after the last match, not after a fixed offset.
    first = await store.list(2, "", Query(tenant="globex"))
    rest = await store.list(10, first.next_page_token, Query(tenant="globex"))
    assert [r.entry.request_id for r in first.records + rest.records] == [
        "req-0",
        "req-3",
        "req-6",
        "req-9",
    ]
    assert rest.next_page_token == ""
    assert (await store.list(0, "", Query(tenant="nobody"))).records == []


async def test_newest_first_pages_back_from_the_tail(store: LedgerStore) -> None:
    for i in range(12):
        await store.append(entry(i, tenant="acme" if i % 3 else "globex", time_ns=1000 + i))
    tail = await store.list(3, "", newest_first=True)
    assert [r.sequence for r in tail.records] == [12, 11, 10]
    seen = [r.sequence for r in tail.records]
    token = tail.next_page_token
    while token:
        page = await store.list(5, token, newest_first=True)
        seen += [r.sequence for r in page.records]
        token = page.next_page_token
    assert seen == list(range(12, 0, -1))
    # Filters hold in this order too: globex's newest within [1003, 1010), a page at a time.
    query = Query(tenant="globex", since_ns=1003, until_ns=1010)
    first = await store.list(1, "", query, newest_first=True)
    rest = await store.list(10, first.next_page_token, query, newest_first=True)
    assert [r.entry.request_id for r in first.records + rest.records] == [
        "req-9",
        "req-6",
        "req-3",
    ]
    assert rest.next_page_token == ""
    assert (await store.list(0, "", Query(tenant="nobody"), newest_first=True)).records == []


async def test_a_batch_is_appended_in_order_on_one_chain(store: LedgerStore) -> None:
    single = await store.append(entry(0))
    batch = await store.append_batch([entry(i) for i in range(1, 6)])
    assert [r.entry.request_id for r in batch] == [f"req-{i}" for i in range(1, 6)]
    assert [r.sequence for r in batch] == list(range(2, 7))
    assert batch[0].prev_hash == single.hash
    for prev, cur in itertools.pairwise(batch):
        assert cur.prev_hash == prev.hash
    assert (await store.list(0, "")).records == [single, *batch]
    assert (await store.verify()).intact


class CountingBackend:
    """A backend that counts its append transactions; `gate`, when set, holds each one open
    until the test releases it."""

    def __init__(self, inner: Backend) -> None:
        self.inner = inner
        self.transactions = 0
        self.entered = asyncio.Event()
        self.gate: asyncio.Event | None = None

    async def open(self) -> None:
        await self.inner.open()

    async def close(self) -> None:
        await self.inner.close()

    async def append(self, seals: Sequence[Seal]) -> list[Row]:
        self.transactions += 1
        self.entered.set()
        if self.gate is not None:
            await self.gate.wait()
        return await self.inner.append(seals)

    async def rows(self, after: int, limit: int, query: Query) -> list[Row]:
        return await self.inner.rows(after, limit, query)

    async def latest(self, before: int | None, limit: int, query: Query) -> list[Row]:
        return await self.inner.latest(before, limit, query)


async def test_concurrent_appends_share_one_transaction_and_keep_the_chain(
    storage: Storage,
) -> None:
    backend = CountingBackend(storage.make())
    store = LedgerStore(backend)
    await store.open()
    try:
        singles = [store.append(entry(i)) for i in range(40)]
        batches = [
            store.append_batch([entry(100 + 10 * b + i) for i in range(5)]) for b in range(4)
        ]
        # All of them are waiting before the first commit starts: one transaction for the lot.
        records, batched = await asyncio.gather(asyncio.gather(*singles), asyncio.gather(*batches))
        verdict = await store.verify()
    finally:
        await store.close()
    assert backend.transactions == 1
    assert (verdict.intact, verdict.records_checked) == (True, 60)
    sequences = [r.sequence for r in records]
    for batch in batched:
        # A batch's entries stay together and in order within the group.
        assert [r.sequence for r in batch] == list(range(batch[0].sequence, batch[0].sequence + 5))
        sequences += [r.sequence for r in batch]
    assert sorted(sequences) == list(range(1, 61))


async def test_appends_arriving_during_a_commit_go_in_the_next_one(storage: Storage) -> None:
    backend = CountingBackend(storage.make())
    backend.gate = asyncio.Event()
    store = LedgerStore(backend)
    await store.open()
    try:
        first = asyncio.ensure_future(store.append(entry(0)))
        await backend.entered.wait()  # the first commit is running, alone
        later = [asyncio.ensure_future(store.append(entry(i))) for i in range(1, 30)]
        backend.gate.set()
        records = [await first, *await asyncio.gather(*later)]
        verdict = await store.verify()
    finally:
        await store.close()
    assert backend.transactions == 2
    assert [r.sequence for r in records] == list(range(1, 31))
    assert (verdict.intact, verdict.records_checked) == (True, 30)


async def test_a_batch_names_the_entry_it_refuses(store: LedgerStore) -> None:
    with pytest.raises(InvalidArgument) as empty:
        await store.append_batch([])
    assert empty.value.field == "entries"
    with pytest.raises(InvalidArgument) as nameless:
        await store.append_batch([entry(1), Entry(request_id="", time_unix_ns=1)])
    assert nameless.value.field == "entries[1].request_id"
    with pytest.raises(InvalidArgument) as large:
        await store.append_batch([entry(i) for i in range(MAX_BATCH + 1)])
    assert large.value.field == "entries"
    # Refused whole: nothing of a refused batch was appended.
    assert (await store.verify()).records_checked == 0


async def test_records_cannot_be_changed_or_deleted(storage: Storage, store: LedgerStore) -> None:
    await store.append(entry(1))
    for sql in ("UPDATE records SET body = 'x'", "DELETE FROM records"):
        with pytest.raises(storage.refused, match="append-only"):
            await storage.raw(sql, (), False)
    assert (await store.verify()).records_checked == 1


async def test_intact_chain_verifies(store: LedgerStore) -> None:
    assert (await store.verify()).intact
    records = [await store.append(entry(i)) for i in range(4)]
    verdict = await store.verify()
    assert verdict.intact
    assert (verdict.records_checked, verdict.head_sequence, verdict.head_hash) == (
        4,
        4,
        records[-1].hash,
    )


async def test_verify_names_an_edited_body(storage: Storage, store: LedgerStore) -> None:
    records = [await store.append(entry(i)) for i in range(6)]
    body = json.loads(canonical(3, records[2].entry))
    body["prompt_tokens"] = 0  # someone hides what a request cost
    forged = json.dumps(body, sort_keys=True, separators=(",", ":"))
    await storage.tamper("UPDATE records SET body = ? WHERE sequence = ?", forged, 3)
    verdict = await store.verify()
    assert not verdict.intact
    assert verdict.first_break is not None
    assert (verdict.first_break.sequence, verdict.first_break.reason) == (
        3,
        BreakReason.HASH_MISMATCH,
    )
    assert (verdict.head_sequence, verdict.head_hash) == (2, records[1].hash)


async def test_verify_names_a_rehashed_record(storage: Storage, store: LedgerStore) -> None:
    # A forger who also recomputes the row's own hash breaks the next record's link.
    records = [await store.append(entry(i)) for i in range(5)]
    forged = canonical(2, entry(99))
    digest = chain_hash(records[0].hash, forged)
    await storage.tamper(
        "UPDATE records SET body = ?, hash = ? WHERE sequence = ?", forged, digest, 2
    )
    verdict = await store.verify()
    assert verdict.first_break is not None
    assert (verdict.first_break.sequence, verdict.first_break.reason) == (
        3,
        BreakReason.PREV_HASH_MISMATCH,
    )


async def test_verify_names_a_deleted_record(storage: Storage, store: LedgerStore) -> None:
    for i in range(5):
        await store.append(entry(i))
    await storage.tamper("DELETE FROM records WHERE sequence = ?", 4)
    verdict = await store.verify()
    assert verdict.first_break is not None
    assert (verdict.first_break.sequence, verdict.first_break.reason) == (
        4,
        BreakReason.SEQUENCE_GAP,
    )


async def test_verify_names_a_moved_body(storage: Storage, store: LedgerStore) -> None:
    # A body whose own sequence disagrees with its row, even with a matching hash.
    await store.append(entry(1))
    moved = canonical(7, entry(2))
    records = (await store.list(0, "")).records
    digest = chain_hash(records[0].hash, moved)
    await storage.tamper(
        "INSERT INTO records (sequence, body, prev_hash, hash) VALUES (?, ?, ?, ?)",
        2,
        moved,
        records[0].hash,
        digest,
    )
    verdict = await store.verify()
    assert verdict.first_break is not None
    assert (verdict.first_break.sequence, verdict.first_break.reason) == (
        2,
        BreakReason.MALFORMED_BODY,
    )


async def test_verify_walks_past_one_scan_batch(store: LedgerStore) -> None:
    for i in range(1203):
        await store.append(entry(i))
    verdict = await store.verify()
    assert (verdict.intact, verdict.records_checked) == (True, 1203)


async def test_routing_and_policy_fields_are_stored_and_hashed(store: LedgerStore) -> None:
    full = Entry(
        request_id="req-full",
        time_unix_ns=1,
        key_id="key-1",
        adapter="legal-lora",
        hops=(Hop(model="router", tier=1, intent="legal"), Hop(model="legal", tier=2)),
        entity_counts={"EMAIL_ADDRESS": 2, "CREDIT_CARD": 1},
        policy_decisions=("fallback:TIER_BURST",),
    )
    record = await store.append(full)
    assert (await store.list(1, "")).records[0] == record
    body = canonical(record.sequence, full)
    assert '"EMAIL_ADDRESS":2' in body
    assert '"intent":"legal"' in body
    assert record.hash == chain_hash("", body)


async def test_csv_export_has_a_header_and_one_line_per_record(store: LedgerStore) -> None:
    await store.append(
        Entry(
            request_id="=HYPERLINK(evil)",
            time_unix_ns=1_700_000_000_123_456_789,
            tenant="acme",
            model='m,odd "name"',
            tier=1,
            hops=(Hop(model="router", tier=1, intent="legal"),),
            entity_counts={"EMAIL_ADDRESS": 1},
            policy_decisions=("a", "b"),
        )
    )
    await store.append(entry(2, tenant="globex"))
    text = "".join([chunk async for chunk in csv_chunks(store.scan(Query(tenant="acme")))])
    rows = list(csv.reader(io.StringIO(text)))
    assert rows[0] == list(COLUMNS)
    assert len(rows) == 2
    row = dict(zip(COLUMNS, rows[1], strict=True))
    assert row["request_id"] == "'=HYPERLINK(evil)"  # stays text in a spreadsheet
    assert row["model"] == 'm,odd "name"'
    assert row["time"] == "2023-11-14T22:13:20.123456789Z"
    assert row["tier"] == "TIER_LOCAL"
    assert json.loads(row["hops"]) == [
        {"model": "router", "tier": "TIER_LOCAL", "upstream": "", "intent": "legal"}
    ]
    assert json.loads(row["entity_counts"]) == {"EMAIL_ADDRESS": 1}
    assert row["policy_decisions"] == "a;b"
    assert row["sequence"] == "1"


async def test_tool_fields_are_stored_listed_and_exported(store: LedgerStore) -> None:
    tooled = Entry(
        request_id="req-tools",
        time_unix_ns=1,
        tools_offered=("get_weather", "send_mail"),
        tool_calls=("send_mail", "send_mail"),
        constraint="tools",
    )
    record = await store.append(tooled)
    assert (await store.list(1, "")).records[0] == record
    text = "".join([chunk async for chunk in csv_chunks(store.scan())])
    row = dict(zip(COLUMNS, list(csv.reader(io.StringIO(text)))[1], strict=True))
    assert row["tools_offered"] == "get_weather;send_mail"
    assert row["tool_calls"] == "send_mail;send_mail"
    assert row["constraint"] == "tools"


async def test_records_written_before_the_tool_fields_existed_still_verify(
    store: LedgerStore, storage: Storage
) -> None:
    backend = storage.make()
    await backend.open()
    try:
        # A body exactly as the ledger wrote it before tools_offered, tool_calls and constraint.
        def seal_old(sequence: int, prev_hash: str) -> tuple[str, str]:
            data = json.loads(canonical(sequence, entry(1)))
            for name in ("tools_offered", "tool_calls", "constraint"):
                del data[name]
            body = json.dumps(data, sort_keys=True, separators=(",", ":"))
            return body, chain_hash(prev_hash, body)

        [old] = await backend.append([seal_old])
    finally:
        await backend.close()
    assert "tool_calls" not in old.body
    await store.append(Entry(request_id="req-new", time_unix_ns=2, tool_calls=("f",)))
    verdict = await store.verify()
    assert (verdict.intact, verdict.records_checked) == (True, 2)
    first, second = (await store.list(10, "")).records
    assert (first.entry.tools_offered, first.entry.tool_calls, first.entry.constraint) == (
        (),
        (),
        "",
    )
    assert second.entry.tool_calls == ("f",)


@pytest.mark.parametrize(
    ("size", "token"), [(1001, ""), (10, "abc"), (10, "-4"), (10, str(2**63)), (10, "9" * 40)]
)
@pytest.mark.parametrize("newest_first", [False, True])
async def test_bad_paging_arguments_are_invalid(
    store: LedgerStore, size: int, token: str, newest_first: bool
) -> None:
    with pytest.raises(InvalidArgument):
        await store.list(size, token, newest_first=newest_first)


def test_an_inverted_time_range_is_invalid() -> None:
    with pytest.raises(InvalidArgument, match="start_time"):
        Query(since_ns=10, until_ns=5)


async def test_request_id_is_required(store: LedgerStore) -> None:
    with pytest.raises(InvalidArgument, match="request_id"):
        await store.append(Entry(request_id="", time_unix_ns=0))


def test_postgresql_backend_needs_a_dsn_when_the_ledger_starts() -> None:
    from ledger.app import build_backend
    from ledger.config import LedgerConfig

    # Every service reads the ledger section; only the ledger's own pods hold the DSN.
    config = LedgerConfig(backend="postgresql")
    with pytest.raises(ValueError, match="postgres_dsn"):
        build_backend(config)
