"""SQLite ledger store: append-only rows, each holding the SHA-256 of the one before."""

from __future__ import annotations

import asyncio
import hashlib
import json
import sqlite3
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path

from slm.errors import InvalidArgument

MAX_PAGE = 1000
DEFAULT_PAGE = 100

_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    sequence   INTEGER PRIMARY KEY,
    body       TEXT NOT NULL,
    prev_hash  TEXT NOT NULL,
    hash       TEXT NOT NULL UNIQUE
);
-- Append-only: the database itself refuses edits and deletions made through SQL.
CREATE TRIGGER IF NOT EXISTS records_no_update BEFORE UPDATE ON records
BEGIN SELECT RAISE(ABORT, 'ledger records are append-only'); END;
CREATE TRIGGER IF NOT EXISTS records_no_delete BEFORE DELETE ON records
BEGIN SELECT RAISE(ABORT, 'ledger records are append-only'); END;
"""


@dataclass(frozen=True)
class Hop:
    """One hop of a routed request (router model, then specialist)."""

    model: str = ""
    tier: int = 0
    upstream: str = ""
    intent: str = ""


@dataclass(frozen=True)
class Entry:
    """What is recorded about one request; never prompt or completion text."""

    request_id: str
    time_unix_ns: int
    tenant: str = ""
    model: str = ""
    tier: int = 0
    upstream: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    ttft_ms: float = 0.0
    latency_ms: float = 0.0
    finish_reason: int = 0
    status_code: int = 0
    operation: str = ""
    key_id: str = ""
    adapter: str = ""
    hops: tuple[Hop, ...] = ()
    # Counts by entity type only: the values themselves never reach the ledger.
    entity_counts: dict[str, int] = field(default_factory=dict)
    policy_decisions: tuple[str, ...] = ()


@dataclass(frozen=True)
class Record:
    sequence: int
    entry: Entry
    prev_hash: str
    hash: str


@dataclass(frozen=True)
class Page:
    records: list[Record] = field(default_factory=list)
    next_page_token: str = ""


def canonical(sequence: int, entry: Entry) -> str:
    """The exact text that is hashed: sorted keys, no whitespace, so any reader can re-derive it."""
    return json.dumps(
        {"sequence": sequence, **asdict(entry)}, sort_keys=True, separators=(",", ":")
    )


def chain_hash(prev_hash: str, body: str) -> str:
    return hashlib.sha256(f"{prev_hash}\n{body}".encode()).hexdigest()


class LedgerStore:
    """The core: appends and pages through records. Thread-safe; blocking calls run off-loop.

    Durability: WAL with synchronous=FULL, so an acknowledged append survives a crash of the
    process or the machine.
    """

    def __init__(self, path: Path) -> None:
        self._path = path
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None
        self._last_hash = ""
        self._last_sequence = 0

    def open(self) -> None:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self._path, check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.executescript(_SCHEMA)
        row = db.execute(
            "SELECT sequence, hash FROM records ORDER BY sequence DESC LIMIT 1"
        ).fetchone()
        if row is not None:
            self._last_sequence, self._last_hash = int(row[0]), str(row[1])
        self._db = db

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    @property
    def db(self) -> sqlite3.Connection:
        if self._db is None:
            raise RuntimeError("ledger store is not open")
        return self._db

    def append(self, entry: Entry) -> Record:
        if not entry.request_id:
            raise InvalidArgument("request_id is required", field="entry.request_id")
        with self._lock:
            sequence = self._last_sequence + 1
            body = canonical(sequence, entry)
            digest = chain_hash(self._last_hash, body)
            self.db.execute(
                "INSERT INTO records (sequence, body, prev_hash, hash) VALUES (?, ?, ?, ?)",
                (sequence, body, self._last_hash, digest),
            )
            record = Record(sequence, entry, self._last_hash, digest)
            self._last_sequence, self._last_hash = sequence, digest
            return record

    def list(self, page_size: int, page_token: str) -> Page:
        size = DEFAULT_PAGE if page_size == 0 else page_size
        if not 0 < size <= MAX_PAGE:
            raise InvalidArgument(f"page_size must be 1..{MAX_PAGE}", field="page_size")
        after = 0
        if page_token:
            try:
                after = int(page_token)
            except ValueError:
                raise InvalidArgument("malformed page_token", field="page_token") from None
        rows = self.db.execute(
            "SELECT sequence, body, prev_hash, hash FROM records WHERE sequence > ? "
            "ORDER BY sequence LIMIT ?",
            (after, size + 1),
        ).fetchall()
        records = [_decode(row) for row in rows[:size]]
        more = len(rows) > size
        return Page(records, str(records[-1].sequence) if more and records else "")

    async def append_async(self, entry: Entry) -> Record:
        return await asyncio.to_thread(self.append, entry)

    async def list_async(self, page_size: int, page_token: str) -> Page:
        return await asyncio.to_thread(self.list, page_size, page_token)


def _decode(row: tuple[int, str, str, str]) -> Record:
    data = json.loads(row[1])
    data.pop("sequence")
    # Bodies written before a field existed simply lack it and decode to its default.
    data["hops"] = tuple(Hop(**hop) for hop in data.get("hops", ()))
    data["policy_decisions"] = tuple(data.get("policy_decisions", ()))
    return Record(int(row[0]), Entry(**data), row[2], row[3])
