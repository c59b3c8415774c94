"""PostgreSQL storage of the ledger (asyncpg): the backend at scale, shared by ledger replicas."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import asyncpg

from ledger.store import Query, Row, Seal
from slm.errors import Unavailable

T = TypeVar("T")

# The body is TEXT, not jsonb: it must keep the exact bytes that were hashed. Filters read it
# through indexed expressions, so no denormalised column can disagree with it.
_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    sequence   BIGINT PRIMARY KEY,
    body       TEXT NOT NULL,
    prev_hash  TEXT NOT NULL,
    hash       TEXT NOT NULL UNIQUE
);
CREATE INDEX IF NOT EXISTS records_by_tenant
    ON records (((body::jsonb) ->> 'tenant'), sequence);
CREATE INDEX IF NOT EXISTS records_by_time
    ON records ((((body::jsonb) ->> 'time_unix_ns')::bigint));
-- Append-only: the database itself refuses edits, deletions and truncation.
CREATE OR REPLACE FUNCTION ledger_refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'ledger records are append-only';
END $$;
CREATE OR REPLACE TRIGGER records_no_change BEFORE UPDATE OR DELETE ON records
    FOR EACH ROW EXECUTE FUNCTION ledger_refuse_change();
CREATE OR REPLACE TRIGGER records_no_truncate BEFORE TRUNCATE ON records
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_refuse_change();
"""

# Replicas starting together must not run the DDL concurrently.
_SCHEMA_LOCK = "SELECT pg_advisory_xact_lock(hashtext('slm.v1.ledger.schema'))"

# Errors that mean "the database cannot be reached or is going away", not a bug of ours.
_UNREACHABLE: tuple[type[BaseException], ...] = (
    OSError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
)


def where(query: Query, *, after: int = 0, before: int | None = None) -> tuple[str, list[Any]]:
    clauses: list[str] = ["sequence > $1"]
    params: list[Any] = [after]
    if before is not None:
        params.append(before)
        clauses.append(f"sequence < ${len(params)}")
    if query.tenant:
        params.append(query.tenant)
        clauses.append(f"((body::jsonb) ->> 'tenant') = ${len(params)}")
    if query.since_ns is not None:
        params.append(query.since_ns)
        clauses.append(f"(((body::jsonb) ->> 'time_unix_ns')::bigint) >= ${len(params)}")
    if query.until_ns is not None:
        params.append(query.until_ns)
        clauses.append(f"(((body::jsonb) ->> 'time_unix_ns')::bigint) < ${len(params)}")
    return " AND ".join(clauses), params


class PostgresBackend:
    """A small connection pool; appends serialise on a table lock, so replicas can share it.

    Durability: every session runs with synchronous_commit=on whatever the server default, so
    an append returns only once its commit is flushed to the server's WAL.
    """

    def __init__(self, dsn: str, max_connections: int = 4) -> None:
        self._dsn = dsn
        self._max_connections = max_connections
        self._pool: asyncpg.Pool | None = None

    async def open(self) -> None:
        try:
            self._pool = await asyncpg.create_pool(
                self._dsn,
                min_size=1,
                max_size=self._max_connections,
                server_settings={"synchronous_commit": "on", "application_name": "slm-ledger"},
            )
        except _UNREACHABLE as error:
            raise Unavailable(f"cannot reach the ledger database: {error}") from None
        async with self._pool.acquire() as db, db.transaction():
            await db.execute(_SCHEMA_LOCK)
            await db.execute(_SCHEMA)

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    async def _run(self, call: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        if self._pool is None:
            raise RuntimeError("ledger store is not open")
        try:
            async with self._pool.acquire() as db:
                return await call(db)
        except _UNREACHABLE as error:
            raise Unavailable(f"ledger storage failed: {error}", retry_after_s=1) from None

    async def append(self, seals: Sequence[Seal]) -> list[Row]:
        async def insert(db: asyncpg.Connection) -> list[Row]:
            async with db.transaction():
                # Conflicts with itself but not with readers: one appender at a time, across
                # every replica, while List and Verify go on.
                await db.execute("LOCK TABLE records IN SHARE ROW EXCLUSIVE MODE")
                head = await db.fetchrow(
                    "SELECT sequence, hash FROM records ORDER BY sequence DESC LIMIT 1"
                )
                sequence, prev_hash = (int(head[0]), str(head[1])) if head else (0, "")
                rows: list[Row] = []
                for seal in seals:
                    sequence += 1
                    body, digest = seal(sequence, prev_hash)
                    rows.append(Row(sequence, body, prev_hash, digest))
                    prev_hash = digest
                # One commit, so one WAL flush, for the whole group.
                await db.executemany(
                    "INSERT INTO records (sequence, body, prev_hash, hash) VALUES ($1, $2, $3, $4)",
                    [(r.sequence, r.body, r.prev_hash, r.hash) for r in rows],
                )
            return rows

        return await self._run(insert)

    async def rows(self, after: int, limit: int, query: Query) -> list[Row]:
        return await self._select(*where(query, after=after), "ORDER BY sequence", limit)

    async def latest(self, before: int | None, limit: int, query: Query) -> list[Row]:
        return await self._select(*where(query, before=before), "ORDER BY sequence DESC", limit)

    async def _select(self, clause: str, params: list[Any], order: str, limit: int) -> list[Row]:
        sql = (
            f"SELECT sequence, body, prev_hash, hash FROM records WHERE {clause} "
            f"{order} LIMIT ${len(params) + 1}"
        )

        async def select(db: asyncpg.Connection) -> list[Row]:
            found = await db.fetch(sql, *params, limit)
            return [Row(int(r[0]), str(r[1]), str(r[2]), str(r[3])) for r in found]

        return await self._run(select)
