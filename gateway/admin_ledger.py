"""Admin REST endpoints for the audit ledger: /admin/ledger (records, verify, export.csv)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime
from typing import Annotated, Any, Literal

import grpc
from fastapi import APIRouter, Query
from google.protobuf import json_format
from google.protobuf.timestamp_pb2 import Timestamp
from pydantic import BaseModel
from starlette.responses import JSONResponse, Response, StreamingResponse

from gateway import errors
from gateway.channels import ChannelsDep
from gateway.protocol import ErrorResponse
from slm.v1 import ledger_pb2

LIST_TIMEOUT_S = 60.0
# Verify and export walk the whole chain.
WALK_TIMEOUT_S = 3600.0
MAX_PAGE = 1000
MAX_TEXT = 4096
ORDERS = {
    "oldest_first": ledger_pb2.LIST_ORDER_OLDEST_FIRST,
    "newest_first": ledger_pb2.LIST_ORDER_NEWEST_FIRST,
}

# The query parameters, declared so that the OpenAPI document states what is refused.
Tenant = Annotated[str, Query(max_length=MAX_TEXT, description="Only this tenant's records.")]
Since = Annotated[
    str | None,
    Query(
        json_schema_extra={"format": "date-time"},
        max_length=64,
        description="RFC 3339 with a time zone; records with since <= time.",
        examples=["2026-01-01T00:00:00Z"],
    ),
]
Until = Annotated[
    str | None,
    Query(
        json_schema_extra={"format": "date-time"},
        max_length=64,
        description="RFC 3339 with a time zone; records with time < until.",
        examples=["2026-12-31T00:00:00Z"],
    ),
]


class BadParam(Exception):
    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.message, self.param = message, param


class RecordPage(BaseModel):
    """GET /admin/ledger/records: `data` holds records as proto3 JSON (field names as in
    ledger.proto's LedgerRecord)."""

    object: Literal["list"] = "list"
    data: list[dict[str, Any]]
    next_page_token: str


class ChainBreak(BaseModel):
    sequence: int
    reason: str
    detail: str


class VerifyReport(BaseModel):
    intact: bool
    records_checked: int
    head_sequence: int
    head_hash: str
    first_break: ChainBreak | None


def record_view(record: ledger_pb2.LedgerRecord) -> dict[str, Any]:
    view = json_format.MessageToDict(
        record, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    # proto3 JSON writes 64-bit integers as strings; a sequence number is small enough.
    view["sequence"] = record.sequence
    return view


def verify_view(result: ledger_pb2.VerifyResponse) -> dict[str, Any]:
    broken = result.first_break
    return {
        "intact": result.intact,
        "records_checked": result.records_checked,
        "head_sequence": result.head_sequence,
        "head_hash": result.head_hash,
        "first_break": (
            {
                "sequence": broken.sequence,
                "reason": ledger_pb2.ChainBreakReason.Name(broken.reason),
                "detail": broken.detail,
            }
            if result.HasField("first_break")
            else None
        ),
    }


def _time(text: str | None, param: str) -> Timestamp | None:
    if text is None:
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise BadParam(f"{param} must be an RFC 3339 time", param) from None
    if moment.tzinfo is None:
        raise BadParam(f"{param} needs a time zone, e.g. Z", param)
    stamp = Timestamp()
    try:
        stamp.FromDatetime(moment)
    except (OverflowError, ValueError):
        # e.g. 0001-01-01T00:00:00+01:00, which is before year 1 in UTC.
        raise BadParam(f"{param} is outside years 1 to 9999 in UTC", param) from None
    return stamp


def ledger_router() -> APIRouter:
    """The /admin/ledger routes (the admin router guards them)."""
    router = APIRouter(prefix="/ledger")
    responses: dict[int | str, dict[str, Any]] = {
        s: {"model": ErrorResponse} for s in (400, 401, 403, 500, 503, 504)
    }

    @router.get("/records", responses={**responses, 200: {"model": RecordPage}})
    async def records(
        channels: ChannelsDep,
        tenant: Tenant = "",
        since: Since = None,
        until: Until = None,
        page_size: Annotated[
            int, Query(ge=0, le=MAX_PAGE, description="0 means the default, 100.")
        ] = 0,
        page_token: Annotated[
            str, Query(max_length=MAX_TEXT, description="next_page_token of the last page.")
        ] = "",
        order: Annotated[
            Literal["oldest_first", "newest_first"],
            Query(description="Sequence order, or newest first (the chain's tail first)."),
        ] = "oldest_first",
    ) -> Response:
        """Records a page at a time, oldest first or newest first, optionally of one tenant
        and time range (since <= time < until). Pass the same filters and order with every
        page."""
        try:
            start, end = _time(since, "since"), _time(until, "until")
        except BadParam as bad:
            return errors.invalid_request(bad.message, bad.param).response()
        message = ledger_pb2.ListRequest(
            tenant=tenant,
            page_size=page_size,
            page_token=page_token,
            start_time=start,
            end_time=end,
            order=ORDERS[order],
        )
        try:
            reply = await channels.ledger.List(message, timeout=LIST_TIMEOUT_S)
        except grpc.aio.AioRpcError as error:
            return errors.from_grpc(error).response()
        return JSONResponse(
            {
                "object": "list",
                "data": [record_view(r) for r in reply.records],
                "next_page_token": reply.next_page_token,
            }
        )

    @router.get("/verify", responses={**responses, 200: {"model": VerifyReport}})
    async def verify(channels: ChannelsDep) -> Response:
        """Walk the whole chain; `first_break` names the first broken link, if any."""
        try:
            reply = await channels.ledger.Verify(ledger_pb2.VerifyRequest(), timeout=WALK_TIMEOUT_S)
        except grpc.aio.AioRpcError as error:
            return errors.from_grpc(error).response()
        return JSONResponse(verify_view(reply))

    @router.get(
        "/export.csv",
        responses={**responses, 200: {"content": {"text/csv": {}}}},
        response_class=StreamingResponse,
    )
    async def export_csv(
        channels: ChannelsDep, tenant: Tenant = "", since: Since = None, until: Until = None
    ) -> Response:
        """The matching records as CSV, streamed, in sequence order."""
        try:
            start, end = _time(since, "since"), _time(until, "until")
        except BadParam as bad:
            return errors.invalid_request(bad.message, bad.param).response()
        call = channels.ledger.ExportCsv(
            ledger_pb2.ExportCsvRequest(tenant=tenant, start_time=start, end_time=end),
            timeout=WALK_TIMEOUT_S,
        )
        chunks = call.__aiter__()
        # The first chunk (the header) arrives before the status line is sent, so an error
        # up to here is a proper HTTP error rather than a 200 with a cut-off body.
        try:
            first = await chunks.__anext__()
        except grpc.aio.AioRpcError as error:
            return errors.from_grpc(error).response()
        except StopAsyncIteration:
            return errors.internal("the ledger sent no CSV header").response()

        async def body() -> AsyncIterator[bytes]:
            try:
                yield first.chunk
                async for response in chunks:
                    yield response.chunk
            finally:
                call.cancel()

        # A later failure aborts the transfer (no final empty chunk), so a client can tell.
        return StreamingResponse(
            body(),
            media_type="text/csv; charset=utf-8",
            headers={"content-disposition": 'attachment; filename="ledger.csv"'},
        )

    return router
