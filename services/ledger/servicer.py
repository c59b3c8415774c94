"""LedgerService over gRPC: converts protobuf to the store's dataclasses and back."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, TypeAlias

from google.protobuf.timestamp_pb2 import Timestamp

from ledger.csv_export import csv_chunks
from ledger.store import Entry, Hop, LedgerStore, Query, Record, Verification
from slm.errors import InvalidArgument
from slm.v1 import ledger_pb2, ledger_pb2_grpc, types_pb2

# grpc ships no type information; the servicer context is untyped.
Context: TypeAlias = Any


# Times are stored as signed 64-bit nanoseconds since the epoch: 1677-09-21 to 2262-04-11.
_NS_RANGE = (-(2**63), 2**63 - 1)


def nanoseconds(time: Timestamp, field: str) -> int:
    """A Timestamp as nanoseconds, or INVALID_ARGUMENT naming `field` when it is not a valid
    Timestamp or lies outside what the ledger stores."""
    if not 0 <= time.nanos <= 999_999_999:
        raise InvalidArgument(f"{field}.nanos must be 0 to 999999999", field=field)
    value = time.seconds * 1_000_000_000 + time.nanos
    if not _NS_RANGE[0] <= value <= _NS_RANGE[1]:
        raise InvalidArgument(
            f"{field} must lie between 1677-09-21 and 2262-04-11 (64-bit nanoseconds)",
            field=field,
        )
    return value


def _text(entry: ledger_pb2.LedgerEntry) -> None:
    """No NUL in any text of an entry: PostgreSQL cannot store it, and no name has one."""
    texts = [
        ("request_id", entry.request_id),
        ("tenant", entry.tenant),
        ("model", entry.model),
        ("upstream", entry.upstream),
        ("operation", entry.operation),
        ("key_id", entry.key_id),
        ("adapter", entry.adapter),
        ("constraint", entry.constraint),
        *(("entity_counts", key) for key in entry.entity_counts),
        *(("policy_decisions", d) for d in entry.policy_decisions),
        *(("tools_offered", name) for name in entry.tools_offered),
        *(("tool_calls", name) for name in entry.tool_calls),
        *(
            (f"hops.{part}", value)
            for hop in entry.hops
            for part, value in (
                ("model", hop.model),
                ("upstream", hop.upstream),
                ("intent", hop.intent),
            )
        ),
    ]
    for field, value in texts:
        if "\x00" in value:
            raise InvalidArgument(f"{field} must not contain NUL characters", field=field)


def entry_from_proto(entry: ledger_pb2.LedgerEntry) -> Entry:
    _text(entry)
    return Entry(
        request_id=entry.request_id,
        time_unix_ns=nanoseconds(entry.time, "entry.time"),
        tenant=entry.tenant,
        model=entry.model,
        tier=entry.tier,
        upstream=entry.upstream,
        prompt_tokens=entry.prompt_tokens,
        completion_tokens=entry.completion_tokens,
        ttft_ms=entry.ttft_ms,
        latency_ms=entry.latency_ms,
        finish_reason=entry.finish_reason,
        status_code=entry.status_code,
        operation=entry.operation,
        key_id=entry.key_id,
        adapter=entry.adapter,
        hops=tuple(
            Hop(model=h.model, tier=h.tier, upstream=h.upstream, intent=h.intent)
            for h in entry.hops
        ),
        entity_counts=dict(entry.entity_counts),
        policy_decisions=tuple(entry.policy_decisions),
        tools_offered=tuple(entry.tools_offered),
        tool_calls=tuple(entry.tool_calls),
        constraint=entry.constraint,
        cache_hit=entry.cache_hit,
    )


def record_to_proto(record: Record) -> ledger_pb2.LedgerRecord:
    e = record.entry
    time = Timestamp()
    time.FromNanoseconds(e.time_unix_ns)
    return ledger_pb2.LedgerRecord(
        sequence=record.sequence,
        prev_hash=record.prev_hash,
        hash=record.hash,
        entry=ledger_pb2.LedgerEntry(
            request_id=e.request_id,
            time=time,
            tenant=e.tenant,
            model=e.model,
            tier=e.tier,  # type: ignore[arg-type]
            upstream=e.upstream,
            prompt_tokens=e.prompt_tokens,
            completion_tokens=e.completion_tokens,
            ttft_ms=e.ttft_ms,
            latency_ms=e.latency_ms,
            finish_reason=e.finish_reason,  # type: ignore[arg-type]
            status_code=e.status_code,
            operation=e.operation,
            key_id=e.key_id,
            adapter=e.adapter,
            hops=[
                types_pb2.RouteHop(
                    model=h.model,
                    tier=h.tier,  # type: ignore[arg-type]
                    upstream=h.upstream,
                    intent=h.intent,
                )
                for h in e.hops
            ],
            entity_counts=e.entity_counts,
            policy_decisions=e.policy_decisions,
            tools_offered=e.tools_offered,
            tool_calls=e.tool_calls,
            constraint=e.constraint,
            cache_hit=e.cache_hit,
        ),
    )


def query_from_proto(tenant: str, start: Timestamp | None, end: Timestamp | None) -> Query:
    if "\x00" in tenant:
        raise InvalidArgument("tenant must not contain NUL characters", field="tenant")
    return Query(
        tenant=tenant,
        since_ns=nanoseconds(start, "start_time") if start is not None else None,
        until_ns=nanoseconds(end, "end_time") if end is not None else None,
    )


def verification_to_proto(result: Verification) -> ledger_pb2.VerifyResponse:
    response = ledger_pb2.VerifyResponse(
        intact=result.intact,
        records_checked=result.records_checked,
        head_sequence=result.head_sequence,
        head_hash=result.head_hash,
    )
    if result.first_break is not None:
        response.first_break.CopyFrom(
            ledger_pb2.ChainBreak(
                sequence=result.first_break.sequence,
                reason=result.first_break.reason.value,  # type: ignore[arg-type]
                detail=result.first_break.detail,
            )
        )
    return response


def _newest_first(order: ledger_pb2.ListOrder.ValueType) -> bool:
    if order == ledger_pb2.LIST_ORDER_NEWEST_FIRST:
        return True
    if order in (ledger_pb2.LIST_ORDER_UNSPECIFIED, ledger_pb2.LIST_ORDER_OLDEST_FIRST):
        return False
    # An order this server does not know (a newer client): refused, never served in another.
    raise InvalidArgument(f"unknown order {order}", field="order")


class LedgerServicer(ledger_pb2_grpc.LedgerServiceServicer):
    def __init__(self, store: LedgerStore) -> None:
        self._store = store

    async def Append(
        self, request: ledger_pb2.AppendRequest, context: Context
    ) -> ledger_pb2.AppendResponse:
        record = await self._store.append(entry_from_proto(request.entry))
        return ledger_pb2.AppendResponse(record=record_to_proto(record))

    async def AppendBatch(
        self, request: ledger_pb2.AppendBatchRequest, context: Context
    ) -> ledger_pb2.AppendBatchResponse:
        records = await self._store.append_batch([entry_from_proto(e) for e in request.entries])
        return ledger_pb2.AppendBatchResponse(records=[record_to_proto(r) for r in records])

    async def List(
        self, request: ledger_pb2.ListRequest, context: Context
    ) -> ledger_pb2.ListResponse:
        query = query_from_proto(
            request.tenant,
            request.start_time if request.HasField("start_time") else None,
            request.end_time if request.HasField("end_time") else None,
        )
        page = await self._store.list(
            request.page_size,
            request.page_token,
            query,
            newest_first=_newest_first(request.order),
        )
        return ledger_pb2.ListResponse(
            records=[record_to_proto(r) for r in page.records],
            next_page_token=page.next_page_token,
        )

    async def Verify(
        self, request: ledger_pb2.VerifyRequest, context: Context
    ) -> ledger_pb2.VerifyResponse:
        return verification_to_proto(await self._store.verify())

    async def ExportCsv(
        self, request: ledger_pb2.ExportCsvRequest, context: Context
    ) -> AsyncIterator[ledger_pb2.ExportCsvResponse]:
        query = query_from_proto(
            request.tenant,
            request.start_time if request.HasField("start_time") else None,
            request.end_time if request.HasField("end_time") else None,
        )
        async for chunk in csv_chunks(self._store.scan(query)):
            yield ledger_pb2.ExportCsvResponse(chunk=chunk.encode())
