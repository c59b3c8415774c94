"""PostgreSQL metadata of the adapter registry (asyncpg), shared by registry replicas."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import asyncpg

from adapters.metadata import COLUMNS, AdapterRecord, AlreadyExists, from_row, to_row
from slm.errors import Unavailable

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS adapters (
    name            TEXT COLLATE "C" PRIMARY KEY,
    base_model      TEXT NOT NULL,
    format          TEXT NOT NULL,
    sha256          TEXT NOT NULL,
    source          TEXT NOT NULL,
    default_scale   DOUBLE PRECISION NOT NULL,
    size_bytes      BIGINT NOT NULL,
    created_unix_ns BIGINT NOT NULL,
    store_path      TEXT NOT NULL,
    tiers           TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS adapters_by_sha256 ON adapters (sha256);
CREATE INDEX IF NOT EXISTS adapters_by_base ON adapters (base_model, name);
"""

# Replicas starting together must not run the DDL concurrently.
_SCHEMA_LOCK = "SELECT pg_advisory_xact_lock(hashtext('slm.v1.adapters.schema'))"

# "The database cannot be reached or is going away", not a bug of ours.
_UNREACHABLE: tuple[type[BaseException], ...] = (
    OSError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
)


class PostgresMetadata:
    def __init__(self, dsn: str) -> None:
        self._dsn = dsn
        self._pool: asyncpg.Pool | None = None

    async def open(self) -> None:
        try:
            self._pool = await asyncpg.create_pool(self._dsn, min_size=1, max_size=4)
        except _UNREACHABLE as error:
            raise Unavailable(f"adapter metadata database unreachable: {error}") from error
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute(_SCHEMA_LOCK)
            await conn.execute(_SCHEMA)

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    async def _run(self, work: Callable[[Any], Awaitable[T]]) -> T:
        if self._pool is None:
            raise RuntimeError("adapter metadata is not open")
        try:
            async with self._pool.acquire() as conn:
                return await work(conn)
        except _UNREACHABLE as error:
            raise Unavailable(f"adapter metadata database unreachable: {error}") from error

    async def insert(self, record: AdapterRecord) -> None:
        async def work(conn: Any) -> None:
            try:
                await conn.execute(
                    f"INSERT INTO adapters ({COLUMNS}) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10)",
                    *to_row(record),
                )
            except asyncpg.UniqueViolationError as error:
                raise AlreadyExists(
                    f"adapter {record.name!r} already exists", field="name"
                ) from error

        await self._run(work)

    async def get(self, name: str) -> AdapterRecord | None:
        async def work(conn: Any) -> AdapterRecord | None:
            row = await conn.fetchrow(f"SELECT {COLUMNS} FROM adapters WHERE name = $1", name)
            return None if row is None else from_row(row)

        return await self._run(work)

    async def list(self, base_model: str, after: str, limit: int) -> list[AdapterRecord]:
        async def work(conn: Any) -> list[AdapterRecord]:
            rows = await conn.fetch(
                f"SELECT {COLUMNS} FROM adapters WHERE name > $1 "
                "AND ($2 = '' OR base_model = $2) ORDER BY name LIMIT $3",
                after,
                base_model,
                limit,
            )
            return [from_row(r) for r in rows]

        return await self._run(work)

    async def delete(self, name: str) -> AdapterRecord | None:
        async def work(conn: Any) -> AdapterRecord | None:
            row = await conn.fetchrow(
                f"DELETE FROM adapters WHERE name = $1 RETURNING {COLUMNS}", name
            )
            return None if row is None else from_row(row)

        return await self._run(work)

    async def count_sha256(self, sha256: str) -> int:
        async def work(conn: Any) -> int:
            return int(
                await conn.fetchval("SELECT count(*) FROM adapters WHERE sha256 = $1", sha256)
            )

        return await self._run(work)
