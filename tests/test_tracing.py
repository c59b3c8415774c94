"""One trace per request: gateway -> Doorman -> inference-local and the ledger, over real OTLP."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import pytest
from helpers import DEFAULT_MODEL, Mesh, free_port, mesh_settings
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from slm.config import TelemetryConfig

pytestmark = pytest.mark.e2e

CHAT = "/slm.v1.DoormanService/Chat"
GENERATE = "/slm.v1.InferenceService/Generate"
APPEND = "/slm.v1.LedgerService/Append"


@dataclass(frozen=True)
class Span:
    service: str
    name: str
    kind: int
    trace_id: str
    span_id: str
    parent_id: str


class OtlpTraceCollector(trace_service_pb2_grpc.TraceServiceServicer):
    """OTLP/gRPC trace receiver: keeps every exported span and wakes up whoever waits."""

    def __init__(self) -> None:
        self.spans: list[Span] = []
        self.arrived = asyncio.Condition()

    async def Export(
        self,
        request: trace_service_pb2.ExportTraceServiceRequest,
        context: grpc.aio.ServicerContext,
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        received: list[Span] = []
        for resource_spans in request.resource_spans:
            service = next(
                (
                    a.value.string_value
                    for a in resource_spans.resource.attributes
                    if a.key == "service.name"
                ),
                "",
            )
            for scope_spans in resource_spans.scope_spans:
                received.extend(
                    Span(
                        service,
                        span.name,
                        span.kind,
                        span.trace_id.hex(),
                        span.span_id.hex(),
                        span.parent_span_id.hex(),
                    )
                    for span in scope_spans.spans
                )
        async with self.arrived:
            self.spans.extend(received)
            self.arrived.notify_all()
        return trace_service_pb2.ExportTraceServiceResponse()

    async def wait_for(self, predicate: Callable[[], bool], timeout_s: float) -> None:
        async with self.arrived:
            await asyncio.wait_for(self.arrived.wait_for(predicate), timeout_s)


def _one(spans: list[Span], service: str, name: str, kind: int) -> Span | None:
    found = [s for s in spans if s.service == service and s.name == name and s.kind == kind]
    return found[0] if len(found) == 1 else None


SERVER, CLIENT = 2, 3  # OTLP's SPAN_KIND_SERVER and SPAN_KIND_CLIENT
HTTP = "POST /v1/chat/completions"
HOPS = (
    ("gateway", HTTP, SERVER),
    ("gateway", CHAT, CLIENT),
    ("doorman", CHAT, SERVER),
    ("doorman", GENERATE, CLIENT),
    ("inference-local", GENERATE, SERVER),
    ("doorman", APPEND, CLIENT),
    ("ledger", APPEND, SERVER),
)


@pytest.fixture(scope="module")
async def hops(
    model_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[tuple[str, str, int], Span]:
    """The spans of one chat request through a mesh exporting to a collector of our own."""
    receiver = OtlpTraceCollector()
    server = grpc.aio.server()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port(f"127.0.0.1:{free_port()}")
    await server.start()
    state = tmp_path_factory.mktemp("traced-mesh")
    settings = mesh_settings(state).model_copy(
        update={"telemetry": TelemetryConfig(otlp_endpoint=f"http://127.0.0.1:{port}")}
    )
    mesh = Mesh(settings, state / "slm.toml", state / "mesh.log")
    with pytest.MonkeyPatch.context() as env:
        # Export each batch within 100 ms rather than 5 s; the test still waits on arrival.
        env.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
        # Started off the event loop, which keeps serving the collector meanwhile.
        await asyncio.to_thread(mesh.start)
    try:
        async with httpx.AsyncClient(base_url=mesh.base_url, timeout=120) as client:
            reply = await client.post(
                "/v1/chat/completions",
                json={
                    "model": DEFAULT_MODEL,
                    "messages": [{"role": "user", "content": "Say hi."}],
                    "max_tokens": 4,
                },
            )
        assert reply.status_code == 200, reply.text
        await receiver.wait_for(
            lambda: all(_one(receiver.spans, *hop) is not None for hop in HOPS), timeout_s=60
        )
    finally:
        code = await asyncio.to_thread(mesh.stop)
        await server.stop(None)
    assert code == 0, mesh.log_tail()
    found = {hop: _one(receiver.spans, *hop) for hop in HOPS}
    spans = {hop: span for hop, span in found.items() if span is not None}
    by_id = {s.span_id: s for s in receiver.spans}
    # Keep the gateway's spans between its HTTP server span and its gRPC call, for the chain.
    spans.update(
        {("gateway", s.span_id, s.kind): s for s in by_id.values() if s.service == "gateway"}
    )
    return spans


async def test_one_trace_from_gateway_through_doorman_to_engine(
    hops: dict[tuple[str, str, int], Span],
) -> None:
    http = hops["gateway", HTTP, SERVER]
    gateway = hops["gateway", CHAT, CLIENT]
    doorman = hops["doorman", CHAT, SERVER]
    to_engine = hops["doorman", GENERATE, CLIENT]
    engine = hops["inference-local", GENERATE, SERVER]
    # One trace, rooted at the gateway's HTTP server span (FastAPI's own instrumentation).
    assert {s.trace_id for s in (gateway, doorman, to_engine, engine)} == {http.trace_id}
    assert http.parent_id == ""
    # The gateway's gRPC call happens inside its handling of the HTTP request.
    gateway_spans = {s.span_id: s for (service, _, _), s in hops.items() if service == "gateway"}
    ancestor = gateway
    while ancestor.parent_id and ancestor.parent_id in gateway_spans:
        ancestor = gateway_spans[ancestor.parent_id]
    assert ancestor == http
    # Each hop's server span is the child of the caller's client span, and the Doorman's call
    # to the engine happens inside its handling of the request.
    assert doorman.parent_id == gateway.span_id
    assert to_engine.parent_id == doorman.span_id
    assert engine.parent_id == to_engine.span_id


async def test_the_ledger_append_is_traced_hop_to_hop(
    hops: dict[tuple[str, str, int], Span],
) -> None:
    to_ledger = hops["doorman", APPEND, CLIENT]
    ledger = hops["ledger", APPEND, SERVER]
    assert ledger.trace_id == to_ledger.trace_id
    assert ledger.parent_id == to_ledger.span_id


async def test_the_ledger_append_joins_the_requests_trace(
    hops: dict[tuple[str, str, int], Span],
) -> None:
    doorman = hops["doorman", CHAT, SERVER]
    to_ledger = hops["doorman", APPEND, CLIENT]
    assert to_ledger.trace_id == doorman.trace_id
    assert to_ledger.parent_id == doorman.span_id
