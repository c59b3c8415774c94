"""Adapter metadata: one record per name, in SQLite (embedded default) or PostgreSQL."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import grpc

from adapters.artefacts import Format, Stored
from slm.errors import SlmError

T = TypeVar("T")


class AlreadyExists(SlmError):
    """The name is taken by another adapter."""

    code = grpc.StatusCode.ALREADY_EXISTS
    reason = "ALREADY_EXISTS"


@dataclass(frozen=True)
class AdapterRecord:
    name: str
    base_model: str
    format: Format
    sha256: str
    source: str
    default_scale: float
    size_bytes: int
    created_unix_ns: int
    store_path: str
    # Tier names as in the config ("local", "gpu", "external"); empty: any.
    tiers: tuple[str, ...] = ()

    @property
    def stored(self) -> Stored:
        return Stored(self.sha256, self.size_bytes, self.store_path)


COLUMNS = (
    "name, base_model, format, sha256, source, default_scale, size_bytes, created_unix_ns, "
    "store_path, tiers"
)


def to_row(record: AdapterRecord) -> tuple[Any, ...]:
    return (
        record.name,
        record.base_model,
        record.format.value,
        record.sha256,
        record.source,
        record.default_scale,
        record.size_bytes,
        record.created_unix_ns,
        record.store_path,
        ",".join(record.tiers),
    )


def from_row(row: Any) -> AdapterRecord:
    tiers = str(row[9])
    return AdapterRecord(
        name=str(row[0]),
        base_model=str(row[1]),
        format=Format(row[2]),
        sha256=str(row[3]),
        source=str(row[4]),
        default_scale=float(row[5]),
        size_bytes=int(row[6]),
        created_unix_ns=int(row[7]),
        store_path=str(row[8]),
        tiers=tuple(tiers.split(",")) if tiers else (),
    )


class MetadataStore(Protocol):
    """What the registry needs from a metadata backend."""

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def insert(self, record: AdapterRecord) -> None:
        """Add a record; AlreadyExists when the name is taken."""

    async def get(self, name: str) -> AdapterRecord | None: ...

    async def list(self, base_model: str, after: str, limit: int) -> list[AdapterRecord]:
        """Records by name, those after `after`, of `base_model` unless it is ""."""

    async def delete(self, name: str) -> AdapterRecord | None:
        """Remove and return the record, or None when there was none."""

    async def count_sha256(self, sha256: str) -> int:
        """How many records name this artefact."""


_SQLITE_SCHEMA = """
CREATE TABLE IF NOT EXISTS adapters (
    name            TEXT PRIMARY KEY,
    base_model      TEXT NOT NULL,
    format          TEXT NOT NULL,
    sha256          TEXT NOT NULL,
    source          TEXT NOT NULL,
    default_scale   REAL NOT NULL,
    size_bytes      INTEGER NOT NULL,
    created_unix_ns INTEGER NOT NULL,
    store_path      TEXT NOT NULL,
    tiers           TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS adapters_by_sha256 ON adapters (sha256);
CREATE INDEX IF NOT EXISTS adapters_by_base ON adapters (base_model, name);
"""


class SqliteMetadata:
    """One SQLite file in WAL mode; calls run in a worker thread, one at a time."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._db: sqlite3.Connection | None = None
        self._lock = threading.Lock()

    async def open(self) -> None:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self._path, check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.executescript(_SQLITE_SCHEMA)
        self._db = db

    async def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    async def _run(self, work: Callable[[sqlite3.Connection], T]) -> T:
        db = self._db
        if db is None:
            raise RuntimeError("adapter metadata is not open")

        def locked() -> T:
            with self._lock:
                return work(db)

        return await asyncio.to_thread(locked)

    async def insert(self, record: AdapterRecord) -> None:
        def work(db: sqlite3.Connection) -> None:
            try:
                db.execute(
                    f"INSERT INTO adapters ({COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?)", to_row(record)
                )
            except sqlite3.IntegrityError as error:
                raise AlreadyExists(
                    f"adapter {record.name!r} already exists", field="name"
                ) from error

        await self._run(work)

    async def get(self, name: str) -> AdapterRecord | None:
        def work(db: sqlite3.Connection) -> AdapterRecord | None:
            row = db.execute(f"SELECT {COLUMNS} FROM adapters WHERE name = ?", (name,)).fetchone()
            return None if row is None else from_row(row)

        return await self._run(work)

    async def list(self, base_model: str, after: str, limit: int) -> list[AdapterRecord]:
        def work(db: sqlite3.Connection) -> list[AdapterRecord]:
            rows = db.execute(
                f"SELECT {COLUMNS} FROM adapters WHERE name > ? AND (? = '' OR base_model = ?) "
                "ORDER BY name LIMIT ?",
                (after, base_model, base_model, limit),
            ).fetchall()
            return [from_row(r) for r in rows]

        return await self._run(work)

    async def delete(self, name: str) -> AdapterRecord | None:
        def work(db: sqlite3.Connection) -> AdapterRecord | None:
            row = db.execute(
                f"DELETE FROM adapters WHERE name = ? RETURNING {COLUMNS}", (name,)
            ).fetchone()
            return None if row is None else from_row(row)

        return await self._run(work)

    async def count_sha256(self, sha256: str) -> int:
        def work(db: sqlite3.Connection) -> int:
            row = db.execute("SELECT count(*) FROM adapters WHERE sha256 = ?", (sha256,)).fetchone()
            return int(row[0])

        return await self._run(work)
