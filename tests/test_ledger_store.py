"""The ledger core: hash chain, paging, append-only, restart."""

from __future__ import annotations

import itertools
import sqlite3
import time
from pathlib import Path

import pytest

from ledger.store import Entry, Hop, LedgerStore, canonical, chain_hash
from slm.errors import InvalidArgument


def entry(n: int) -> Entry:
    return Entry(request_id=f"req-{n}", time_unix_ns=time.time_ns(), model="m", prompt_tokens=n)


@pytest.fixture
def store(tmp_path: Path) -> LedgerStore:
    s = LedgerStore(tmp_path / "ledger.sqlite3")
    s.open()
    return s


def test_each_record_holds_the_hash_of_the_previous(store: LedgerStore) -> None:
    records = [store.append(entry(i)) for i in range(5)]
    assert records[0].prev_hash == ""
    for prev, cur in itertools.pairwise(records):
        assert cur.prev_hash == prev.hash
        assert cur.sequence == prev.sequence + 1
    # Anyone can re-derive a hash from the stored canonical body.
    last = records[-1]
    assert last.hash == chain_hash(last.prev_hash, canonical(last.sequence, last.entry))


def test_chain_continues_after_reopen(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite3"
    first = LedgerStore(path)
    first.open()
    a = first.append(entry(1))
    first.close()
    second = LedgerStore(path)
    second.open()
    b = second.append(entry(2))
    assert (b.sequence, b.prev_hash) == (a.sequence + 1, a.hash)


def test_paging_walks_every_record_once(store: LedgerStore) -> None:
    for i in range(7):
        store.append(entry(i))
    seen: list[int] = []
    token = ""
    while True:
        page = store.list(3, token)
        seen += [r.sequence for r in page.records]
        if not page.next_page_token:
            break
        token = page.next_page_token
    assert seen == list(range(1, 8))
    assert store.list(0, "").records[0].entry == store.list(1, "").records[0].entry


def test_records_cannot_be_changed_or_deleted_through_sql(store: LedgerStore) -> None:
    store.append(entry(1))
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        store.db.execute("UPDATE records SET body = 'x'")
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        store.db.execute("DELETE FROM records")


@pytest.mark.parametrize(("size", "token"), [(1001, ""), (10, "abc")])
def test_bad_paging_arguments_are_invalid(store: LedgerStore, size: int, token: str) -> None:
    with pytest.raises(InvalidArgument):
        store.list(size, token)


def test_request_id_is_required(store: LedgerStore) -> None:
    with pytest.raises(InvalidArgument, match="request_id"):
        store.append(Entry(request_id="", time_unix_ns=0))


def test_routing_and_policy_fields_are_stored_and_hashed(store: LedgerStore) -> None:
    full = Entry(
        request_id="req-full",
        time_unix_ns=1,
        key_id="key-1",
        adapter="legal-lora",
        hops=(Hop(model="router", tier=1, intent="legal"), Hop(model="legal", tier=2)),
        entity_counts={"EMAIL_ADDRESS": 2, "CREDIT_CARD": 1},
        policy_decisions=("fallback:TIER_BURST",),
    )
    record = store.append(full)
    assert store.list(1, "").records[0] == record
    body = canonical(record.sequence, full)
    assert '"EMAIL_ADDRESS":2' in body
    assert '"intent":"legal"' in body
    assert record.hash == chain_hash("", body)
