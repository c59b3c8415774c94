"""The ledger core: hash-chained records over a storage backend, paging, verification, export."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any, Protocol

from slm.errors import InvalidArgument, Unavailable

MAX_PAGE = 1000
DEFAULT_PAGE = 100
# Rows read per backend call while walking the chain (verify, export).
SCAN_BATCH = 500
# Entries of one AppendBatch call.
MAX_BATCH = 1000
# Entries of one group commit: concurrent appends share a transaction up to this size.
MAX_GROUP = 4000

# seal(sequence, prev_hash) -> (body, hash): what the backend stores at `sequence`.
Seal = Callable[[int, str], tuple[str, str]]


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
    # Tool names offered and called (one per call), and the constraint's kind; never a tool's
    # description, schema, arguments or result.
    tools_offered: tuple[str, ...] = ()
    tool_calls: tuple[str, ...] = ()
    constraint: str = ""
    # The answer was replayed from the Doorman's result cache: no upstream saw the request.
    cache_hit: bool = False


@dataclass(frozen=True)
class Record:
    sequence: int
    entry: Entry
    prev_hash: str
    hash: str


@dataclass(frozen=True)
class Row:
    """A record as the backend stores it: the body is the exact text that was hashed."""

    sequence: int
    body: str
    prev_hash: str
    hash: str


@dataclass(frozen=True)
class Query:
    """Filters of List and export: one tenant and/or the half-open range [since, until)."""

    tenant: str = ""
    since_ns: int | None = None
    until_ns: int | None = None

    def __post_init__(self) -> None:
        if (
            self.since_ns is not None
            and self.until_ns is not None
            and self.since_ns > self.until_ns
        ):
            raise InvalidArgument("start_time is after end_time", field="start_time")


@dataclass(frozen=True)
class Page:
    records: list[Record] = field(default_factory=list)
    next_page_token: str = ""


class BreakReason(Enum):
    HASH_MISMATCH = 1
    PREV_HASH_MISMATCH = 2
    SEQUENCE_GAP = 3
    MALFORMED_BODY = 4


@dataclass(frozen=True)
class ChainBreak:
    sequence: int
    reason: BreakReason
    detail: str


@dataclass(frozen=True)
class Verification:
    records_checked: int
    head_sequence: int
    head_hash: str
    first_break: ChainBreak | None = None

    @property
    def intact(self) -> bool:
        return self.first_break is None


class Backend(Protocol):
    """Storage of rows. Implementations refuse UPDATE and DELETE in the database itself and
    report storage faults as slm.errors.Unavailable."""

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def append(self, seals: Sequence[Seal]) -> list[Row]:
        """Atomically: read the head; for each seal in order, call seal(next_sequence,
        prev_hash) -> (body, hash) with the hash of the row before; insert the rows and make
        them durable in one commit (all or none). Appends from several processes must
        serialise."""
        ...

    async def rows(self, after: int, limit: int, query: Query) -> list[Row]:
        """Up to `limit` rows with sequence > after that match `query`, in sequence order."""
        ...

    async def latest(self, before: int | None, limit: int, query: Query) -> list[Row]:
        """Up to `limit` rows with sequence < before (any, when None) that match `query`,
        newest first."""
        ...


def canonical(sequence: int, entry: Entry) -> str:
    """The exact text that is hashed: sorted keys, no whitespace, so any reader can re-derive it.

    The hash covers the stored body, never a re-encoding of it, so adding a field changes only
    new bodies: a record written before the field existed lacks it and still verifies.
    """
    return json.dumps(
        {"sequence": sequence, **asdict(entry)},
        sort_keys=True,
        separators=(",", ":"),
    )


def chain_hash(prev_hash: str, body: str) -> str:
    return hashlib.sha256(f"{prev_hash}\n{body}".encode()).hexdigest()


def decode(row: Row) -> Record:
    data: dict[str, Any] = json.loads(row.body)
    data.pop("sequence")
    # Bodies written before a field existed simply lack it and decode to its default.
    data["hops"] = tuple(Hop(**hop) for hop in data.get("hops", ()))
    for name in ("policy_decisions", "tools_offered", "tool_calls"):
        data[name] = tuple(data.get(name, ()))
    return Record(row.sequence, Entry(**data), row.prev_hash, row.hash)


def check_link(row: Row, prev_sequence: int, prev_hash: str) -> ChainBreak | None:
    """Whether `row` correctly follows the record (prev_sequence, prev_hash)."""
    if row.sequence != prev_sequence + 1:
        return ChainBreak(
            prev_sequence + 1,
            BreakReason.SEQUENCE_GAP,
            f"record {prev_sequence + 1} is missing; the next stored record is {row.sequence}",
        )
    if row.prev_hash != prev_hash:
        return ChainBreak(
            row.sequence,
            BreakReason.PREV_HASH_MISMATCH,
            f"prev_hash is {row.prev_hash or '(empty)'}, "
            f"the record before has hash {prev_hash or '(none)'}",
        )
    expected = chain_hash(row.prev_hash, row.body)
    if row.hash != expected:
        return ChainBreak(
            row.sequence,
            BreakReason.HASH_MISMATCH,
            f"stored hash is {row.hash}, the stored body and prev_hash hash to {expected}",
        )
    try:
        data = json.loads(row.body)
        body_sequence = data["sequence"] if isinstance(data, dict) else None
        decode(row)
    except (ValueError, KeyError, TypeError) as error:
        return ChainBreak(row.sequence, BreakReason.MALFORMED_BODY, f"undecodable body: {error}")
    if body_sequence != row.sequence:
        return ChainBreak(
            row.sequence,
            BreakReason.MALFORMED_BODY,
            f"the body is record {body_sequence}, stored as record {row.sequence}",
        )
    return None


def _sealer(entry: Entry) -> Seal:
    def seal(sequence: int, prev_hash: str) -> tuple[str, str]:
        body = canonical(sequence, entry)
        return body, chain_hash(prev_hash, body)

    return seal


@dataclass
class _Waiting:
    """An append waiting for the next group commit."""

    entries: Sequence[Entry]
    done: asyncio.Future[list[Record]]


class LedgerStore:
    """Appends, pages, verifies and exports records; what is stored is up to the backend.

    Group commit: appends that arrive while a commit is running wait for the next one and
    share its transaction (and its fsync), each caller's entries kept together in its order.
    """

    def __init__(self, backend: Backend) -> None:
        self._backend = backend
        self._waiting: list[_Waiting] = []
        self._committer: asyncio.Task[None] | None = None

    async def open(self) -> None:
        await self._backend.open()

    async def close(self) -> None:
        if self._committer is not None:
            # Appends already accepted finish before the storage goes away.
            await asyncio.shield(self._committer)
        await self._backend.close()

    async def append(self, entry: Entry) -> Record:
        if not entry.request_id:
            raise InvalidArgument("request_id is required", field="entry.request_id")
        return (await self._group_commit([entry]))[0]

    async def append_batch(self, entries: Sequence[Entry]) -> list[Record]:
        """Append `entries` in order, all in one transaction: durable when this returns."""
        if not entries:
            raise InvalidArgument("entries must not be empty", field="entries")
        if len(entries) > MAX_BATCH:
            raise InvalidArgument(f"at most {MAX_BATCH} entries per batch", field="entries")
        for i, entry in enumerate(entries):
            if not entry.request_id:
                raise InvalidArgument("request_id is required", field=f"entries[{i}].request_id")
        return await self._group_commit(entries)

    async def _group_commit(self, entries: Sequence[Entry]) -> list[Record]:
        waiting = _Waiting(entries, asyncio.get_running_loop().create_future())
        self._waiting.append(waiting)
        if self._committer is None:
            # A task of its own: a caller that goes away must not cancel the others' commit.
            self._committer = asyncio.get_running_loop().create_task(
                self._commit(), name="ledger-group-commit"
            )
        return await waiting.done

    async def _commit(self) -> None:
        try:
            while self._waiting:
                group: list[_Waiting] = []
                size = 0
                while self._waiting and (
                    not group or size + len(self._waiting[0].entries) <= MAX_GROUP
                ):
                    size += len(self._waiting[0].entries)
                    group.append(self._waiting.pop(0))
                seals = [_sealer(entry) for waiting in group for entry in waiting.entries]
                try:
                    rows = await self._backend.append(seals)
                except BaseException as error:
                    failure = (
                        error
                        if isinstance(error, Exception)
                        else Unavailable("the ledger is shutting down", retry_after_s=1)
                    )
                    for waiting in group:
                        if not waiting.done.done():
                            waiting.done.set_exception(failure)
                    if not isinstance(error, Exception):
                        raise
                    continue
                start = 0
                for waiting in group:
                    mine = rows[start : start + len(waiting.entries)]
                    start += len(waiting.entries)
                    if not waiting.done.done():
                        waiting.done.set_result(
                            [
                                Record(row.sequence, entry, row.prev_hash, row.hash)
                                for row, entry in zip(mine, waiting.entries, strict=True)
                            ]
                        )
        finally:
            self._committer = None

    async def list(
        self,
        page_size: int,
        page_token: str,
        query: Query | None = None,
        *,
        newest_first: bool = False,
    ) -> Page:
        """A page of records in sequence order, or newest first; the token continues it."""
        size = DEFAULT_PAGE if page_size == 0 else page_size
        if not 0 < size <= MAX_PAGE:
            raise InvalidArgument(f"page_size must be 1..{MAX_PAGE}", field="page_size")
        bound: int | None = None
        if page_token:
            try:
                bound = int(page_token)
            except ValueError:
                raise InvalidArgument("malformed page_token", field="page_token") from None
            # Sequences are 64-bit signed in both databases.
            if not 0 <= bound < 2**63:
                raise InvalidArgument("malformed page_token", field="page_token")
        if newest_first:
            rows = await self._backend.latest(bound, size + 1, query or Query())
        else:
            rows = await self._backend.rows(bound or 0, size + 1, query or Query())
        records = [decode(row) for row in rows[:size]]
        more = len(rows) > size
        # The last sequence returned: the next page starts after it (before it, newest first).
        return Page(records, str(records[-1].sequence) if more and records else "")

    async def scan(self, query: Query | None = None) -> AsyncIterator[Sequence[Record]]:
        """Every matching record, in batches, without holding a cursor open between them."""
        after = 0
        while True:
            rows = await self._backend.rows(after, SCAN_BATCH, query or Query())
            if not rows:
                return
            yield [decode(row) for row in rows]
            after = rows[-1].sequence

    async def verify(self) -> Verification:
        """Walk the whole chain from the first record; stop at the first broken link."""
        checked, head_sequence, head_hash = 0, 0, ""
        while True:
            rows = await self._backend.rows(head_sequence, SCAN_BATCH, Query())
            if not rows:
                return Verification(checked, head_sequence, head_hash)
            for row in rows:
                checked += 1
                broken = check_link(row, head_sequence, head_hash)
                if broken is not None:
                    return Verification(checked, head_sequence, head_hash, broken)
                head_sequence, head_hash = row.sequence, row.hash
