"""`slm ledger verify|export`: the ledger's RPCs from the command line."""

from __future__ import annotations

import argparse
import asyncio
import sys
from datetime import datetime
from pathlib import Path
from typing import BinaryIO, TextIO

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from slm.errors import from_rpc_error
from slm.v1 import ledger_pb2, ledger_pb2_grpc

# Exit codes: the chain is intact / it is broken / the ledger could not answer.
OK, BROKEN, FAILED = 0, 1, 2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["verify", "export"])
    parser.add_argument("--address", help="LedgerService host:port (default: from the config)")
    parser.add_argument("--tenant", default="", help="export: only this tenant")
    parser.add_argument("--since", type=_timestamp, help="export: from this ISO 8601 time on")
    parser.add_argument("--until", type=_timestamp, help="export: before this ISO 8601 time")
    parser.add_argument("--output", "-o", help="export: CSV file to write (default: stdout)")


def _timestamp(text: str) -> Timestamp:
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 time: {text!r}") from None
    if moment.tzinfo is None:
        raise argparse.ArgumentTypeError(f"give a time zone, e.g. {text}Z or {text}+00:00")
    stamp = Timestamp()
    stamp.FromDatetime(moment)
    return stamp


async def verify(address: str, out: TextIO) -> int:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = ledger_pb2_grpc.LedgerServiceStub(channel)
        result = await stub.Verify(ledger_pb2.VerifyRequest(), timeout=3600)
    if result.intact:
        print(
            f"intact: {result.records_checked} records, "
            f"head {result.head_sequence} {result.head_hash or '(empty)'}",
            file=out,
        )
        return OK
    broken = result.first_break
    reason = ledger_pb2.ChainBreakReason.Name(broken.reason).removeprefix("CHAIN_BREAK_REASON_")
    print(f"BROKEN at record {broken.sequence}: {reason}: {broken.detail}", file=out)
    print(f"last intact record: {result.head_sequence} {result.head_hash or '(none)'}", file=out)
    return BROKEN


async def export(args: argparse.Namespace, address: str, out: BinaryIO) -> int:
    request = ledger_pb2.ExportCsvRequest(tenant=args.tenant)
    if args.since is not None:
        request.start_time.CopyFrom(args.since)
    if args.until is not None:
        request.end_time.CopyFrom(args.until)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = ledger_pb2_grpc.LedgerServiceStub(channel)
        async for response in stub.ExportCsv(request, timeout=3600):
            out.write(response.chunk)
    out.flush()
    return OK


def run(args: argparse.Namespace, default_address: str) -> int:
    address = args.address or default_address
    try:
        if args.action == "verify":
            return asyncio.run(verify(address, sys.stdout))
        if not args.output:
            return asyncio.run(export(args, address, sys.stdout.buffer))
        # Written aside and renamed at the end: a failed export leaves no truncated CSV behind.
        target = Path(args.output)
        partial = target.with_name(target.name + ".part")
        try:
            with partial.open("wb") as out:
                code = asyncio.run(export(args, address, out))
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        partial.replace(target)
        return code
    except grpc.aio.AioRpcError as error:
        failure = from_rpc_error(error)
        print(f"slm ledger {args.action}: {failure.message} ({address})", file=sys.stderr)
        return FAILED
