"""SQLite (WAL) storage of the ledger: the embedded default."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from ledger.store import Query, Row, Seal
from slm.errors import Unavailable

T = TypeVar("T")

# The body is the single source of truth; filters read it through indexed expressions, so no
# denormalised column can disagree with what was hashed.
_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    sequence   INTEGER PRIMARY KEY,
    body       TEXT NOT NULL,
    prev_hash  TEXT NOT NULL,
    hash       TEXT NOT NULL UNIQUE
);
CREATE INDEX IF NOT EXISTS records_by_tenant
    ON records (json_extract(body, '$.tenant'), sequence);
CREATE INDEX IF NOT EXISTS records_by_time
    ON records (json_extract(body, '$.time_unix_ns'));
-- Append-only: the database itself refuses edits and deletions made through SQL.
CREATE TRIGGER IF NOT EXISTS records_no_update BEFORE UPDATE ON records
BEGIN SELECT RAISE(ABORT, 'ledger records are append-only'); END;
CREATE TRIGGER IF NOT EXISTS records_no_delete BEFORE DELETE ON records
BEGIN SELECT RAISE(ABORT, 'ledger records are append-only'); END;
"""


def where(query: Query, *, after: int = 0, before: int | None = None) -> tuple[str, list[Any]]:
    clauses: list[str] = ["sequence > ?"]
    params: list[Any] = [after]
    if before is not None:
        clauses.append("sequence < ?")
        params.append(before)
    if query.tenant:
        clauses.append("json_extract(body, '$.tenant') = ?")
        params.append(query.tenant)
    if query.since_ns is not None:
        clauses.append("json_extract(body, '$.time_unix_ns') >= ?")
        params.append(query.since_ns)
    if query.until_ns is not None:
        clauses.append("json_extract(body, '$.time_unix_ns') < ?")
        params.append(query.until_ns)
    return " AND ".join(clauses), params


class SqliteBackend:
    """One writer and one reader connection, each behind a lock; calls run off the event loop.

    Durability: WAL with synchronous=FULL, so every commit fsyncs the WAL before the append
    returns: an acknowledged record survives kill -9 of the process and a power loss.
    """

    def __init__(self, path: Path) -> None:
        self._path = path
        self._writer: sqlite3.Connection | None = None
        self._reader: sqlite3.Connection | None = None
        self._write_lock = threading.Lock()
        self._read_lock = threading.Lock()

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self._path, check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("PRAGMA busy_timeout=5000")
        return db

    async def open(self) -> None:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        self._writer = self._connect()
        self._writer.executescript(_SCHEMA)
        self._reader = self._connect()

    async def close(self) -> None:
        for db in (self._writer, self._reader):
            if db is not None:
                db.close()
        self._writer = self._reader = None

    @staticmethod
    def _require(db: sqlite3.Connection | None) -> sqlite3.Connection:
        if db is None:
            raise RuntimeError("ledger store is not open")
        return db

    async def _run(self, lock: threading.Lock, call: Callable[[], T]) -> T:
        def locked() -> T:
            with lock:
                try:
                    return call()
                except sqlite3.OperationalError as error:
                    raise Unavailable(f"ledger storage failed: {error}", retry_after_s=1) from None

        return await asyncio.to_thread(locked)

    async def append(self, seals: Sequence[Seal]) -> list[Row]:
        db = self._require(self._writer)

        def insert() -> list[Row]:
            # IMMEDIATE takes the write lock before reading the head, so two processes sharing
            # the file cannot both extend the same head.
            db.execute("BEGIN IMMEDIATE")
            try:
                head = db.execute(
                    "SELECT sequence, hash FROM records ORDER BY sequence DESC LIMIT 1"
                ).fetchone()
                sequence, prev_hash = (int(head[0]), str(head[1])) if head else (0, "")
                rows: list[Row] = []
                for seal in seals:
                    sequence += 1
                    body, digest = seal(sequence, prev_hash)
                    rows.append(Row(sequence, body, prev_hash, digest))
                    prev_hash = digest
                db.executemany(
                    "INSERT INTO records (sequence, body, prev_hash, hash) VALUES (?, ?, ?, ?)",
                    [(r.sequence, r.body, r.prev_hash, r.hash) for r in rows],
                )
                # One commit, so one fsync of the WAL, for the whole group.
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
            return rows

        return await self._run(self._write_lock, insert)

    async def rows(self, after: int, limit: int, query: Query) -> list[Row]:
        return await self._select(*where(query, after=after), "ORDER BY sequence", limit)

    async def latest(self, before: int | None, limit: int, query: Query) -> list[Row]:
        return await self._select(*where(query, before=before), "ORDER BY sequence DESC", limit)

    async def _select(self, clause: str, params: list[Any], order: str, limit: int) -> list[Row]:
        db = self._require(self._reader)

        def select() -> list[Row]:
            found = db.execute(
                f"SELECT sequence, body, prev_hash, hash FROM records WHERE {clause} "
                f"{order} LIMIT ?",
                (*params, limit),
            ).fetchall()
            return [Row(int(r[0]), str(r[1]), str(r[2]), str(r[3])) for r in found]

        return await self._run(self._read_lock, select)
