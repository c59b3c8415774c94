"""LedgerService as a real grpc.aio server on port 0, called through a real stub."""

from __future__ import annotations

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from slm.server import GrpcService
from slm.v1 import ledger_pb2, ledger_pb2_grpc, types_pb2


def address(service: GrpcService) -> str:
    return f"127.0.0.1:{service.port}"


async def test_routing_and_policy_fields_round_trip(ledger_server: GrpcService) -> None:
    now = Timestamp()
    now.GetCurrentTime()
    entry = ledger_pb2.LedgerEntry(
        request_id="routed",
        time=now,
        key_id="key-7",
        adapter="legal-lora",
        hops=[
            types_pb2.RouteHop(model="router", tier=types_pb2.TIER_LOCAL, intent="legal"),
            types_pb2.RouteHop(model="legal", tier=types_pb2.TIER_LOCAL, upstream="x:1"),
        ],
        entity_counts={"EMAIL_ADDRESS": 2},
        policy_decisions=["fallback:TIER_LOCAL"],
    )
    async with grpc.aio.insecure_channel(address(ledger_server)) as channel:
        ledger = ledger_pb2_grpc.LedgerServiceStub(channel)
        appended = (await ledger.Append(ledger_pb2.AppendRequest(entry=entry))).record
        listed = (await ledger.List(ledger_pb2.ListRequest())).records
    assert appended.entry == entry
    assert list(listed) == [appended]
