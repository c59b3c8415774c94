"""Admin REST endpoints for the audit ledger: /admin/ledger (records, verify, export.csv)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

import grpc
from fastapi import APIRouter, Request
from google.protobuf import json_format
from google.protobuf.timestamp_pb2 import Timestamp
from starlette.responses import JSONResponse, Response, StreamingResponse

from gateway import errors
from gateway.channels import ChannelsDep
from gateway.protocol import ErrorResponse
from slm.v1 import ledger_pb2

LIST_TIMEOUT_S = 60.0
# Verify and export walk the whole chain.
WALK_TIMEOUT_S = 3600.0


class BadParam(Exception):
    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.message, self.param = message, param


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


def _time(request: Request, param: str) -> Timestamp | None:
    text = request.query_params.get(param)
    if not text:
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise BadParam(f"{param} must be an RFC 3339 time", param) from None
    if moment.tzinfo is None:
        raise BadParam(f"{param} needs a time zone, e.g. Z", param)
    stamp = Timestamp()
    stamp.FromDatetime(moment)
    return stamp


def _filters(request: Request) -> tuple[str, Timestamp | None, Timestamp | None]:
    return (
        request.query_params.get("tenant", ""),
        _time(request, "since"),
        _time(request, "until"),
    )


def ledger_router() -> APIRouter:
    """The /admin/ledger routes (the admin router guards them)."""
    router = APIRouter(prefix="/ledger")
    responses: dict[int | str, dict[str, Any]] = {
        s: {"model": ErrorResponse} for s in (400, 401, 403, 500, 503, 504)
    }

    @router.get("/records", responses=responses)
    async def records(request: Request, channels: ChannelsDep) -> Response:
        """Records in sequence order, a page at a time. Query: tenant, since and until
        (RFC 3339, since <= time < until), page_size (1-1000, default 100), page_token."""
        try:
            tenant, since, until = _filters(request)
            size = request.query_params.get("page_size", "0")
            if not size.isdigit():
                raise BadParam("page_size must be a whole number", "page_size")
        except BadParam as bad:
            return errors.invalid_request(bad.message, bad.param).response()
        message = ledger_pb2.ListRequest(
            tenant=tenant,
            page_size=int(size),
            page_token=request.query_params.get("page_token", ""),
            start_time=since,
            end_time=until,
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

    @router.get("/verify", responses=responses)
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
    async def export_csv(request: Request, channels: ChannelsDep) -> Response:
        """The matching records as CSV, streamed. Query: tenant, since, until (RFC 3339)."""
        try:
            tenant, since, until = _filters(request)
        except BadParam as bad:
            return errors.invalid_request(bad.message, bad.param).response()
        call = channels.ledger.ExportCsv(
            ledger_pb2.ExportCsvRequest(tenant=tenant, start_time=since, end_time=until),
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
