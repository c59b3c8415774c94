"""inference-local, ledger and Doorman as real grpc.aio servers on port 0, with real stubs."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from helpers import DEFAULT_MODEL, mesh_settings, runtime
from prometheus_client import CollectorRegistry

from slm.errors import InvalidArgument, NotFound, from_rpc_error
from slm.server import GrpcService
from slm.v1 import (
    doorman_pb2,
    doorman_pb2_grpc,
    inference_pb2,
    inference_pb2_grpc,
    ledger_pb2,
    ledger_pb2_grpc,
    types_pb2,
)


def address(service: GrpcService) -> str:
    return f"127.0.0.1:{service.port}"


@pytest.fixture
async def inference(
    inference_server: GrpcService,
) -> AsyncIterator[inference_pb2_grpc.InferenceServiceStub]:
    async with grpc.aio.insecure_channel(address(inference_server)) as channel:
        yield inference_pb2_grpc.InferenceServiceStub(channel)


async def test_generate_streams_deltas_then_end(
    inference: inference_pb2_grpc.InferenceServiceStub,
) -> None:
    request = inference_pb2.GenerateRequest(
        model=DEFAULT_MODEL,
        chat=types_pb2.ChatInput(
            messages=[types_pb2.ChatMessage(role=types_pb2.ROLE_USER, content="Say hello.")]
        ),
        sampling=types_pb2.SamplingParams(max_tokens=8, seed=1),
    )
    responses = [r async for r in inference.Generate(request)]
    assert [r.WhichOneof("event") for r in responses[:-1]] == ["delta"] * (len(responses) - 1)
    end = responses[-1].end
    assert end.finish_reason in (types_pb2.FINISH_REASON_STOP, types_pb2.FINISH_REASON_LENGTH)
    assert end.usage.total_tokens == end.usage.prompt_tokens + end.usage.completion_tokens
    assert end.tier == types_pb2.TIER_LOCAL


async def test_generate_errors_carry_status_details(
    inference: inference_pb2_grpc.InferenceServiceStub,
) -> None:
    too_long = inference_pb2.GenerateRequest(model=DEFAULT_MODEL, prompt="word " * 3000)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        [r async for r in inference.Generate(too_long)]
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    error = from_rpc_error(caught.value)
    assert isinstance(error, InvalidArgument)
    assert (error.reason, error.field) == ("CONTEXT_LENGTH_EXCEEDED", "prompt")
    assert "2048" in error.message

    unknown = inference_pb2.GenerateRequest(model="nope", prompt="hi")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        [r async for r in inference.Generate(unknown)]
    assert isinstance(from_rpc_error(caught.value), NotFound)

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        [r async for r in inference.Generate(inference_pb2.GenerateRequest(model=DEFAULT_MODEL))]
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_health_reflection_and_models(inference_server: GrpcService) -> None:
    async with grpc.aio.insecure_channel(address(inference_server)) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        reply = await health.Check(health_pb2.HealthCheckRequest(service="slm.v1.InferenceService"))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING

        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        async for answer in reflection.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        ):
            names = {s.name for s in answer.list_services_response.service}
            break
        assert {"slm.v1.InferenceService", "grpc.health.v1.Health"} <= names

        models = await inference_pb2_grpc.InferenceServiceStub(channel).ListModels(
            inference_pb2.ListModelsRequest()
        )
        assert [(m.name, m.loaded, m.context_length) for m in models.models] == [
            (DEFAULT_MODEL, True, 2048)
        ]


async def test_ledger_append_and_list(ledger_server: GrpcService) -> None:
    async with grpc.aio.insecure_channel(address(ledger_server)) as channel:
        ledger = ledger_pb2_grpc.LedgerServiceStub(channel)
        now = Timestamp()
        now.GetCurrentTime()
        appended = []
        for i in range(3):
            entry = ledger_pb2.LedgerEntry(
                request_id=f"r{i}", time=now, model="m", tier=types_pb2.TIER_LOCAL
            )
            appended.append((await ledger.Append(ledger_pb2.AppendRequest(entry=entry))).record)
        assert appended[1].prev_hash == appended[0].hash
        page = await ledger.List(ledger_pb2.ListRequest(page_size=2))
        assert [r.entry.request_id for r in page.records] == ["r0", "r1"]
        rest = await ledger.List(ledger_pb2.ListRequest(page_token=page.next_page_token))
        assert [r.entry.request_id for r in rest.records] == ["r2"]
        assert rest.records[0] == appended[2]
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await ledger.Append(ledger_pb2.AppendRequest(entry=ledger_pb2.LedgerEntry()))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.fixture
async def doorman(
    inference_server: GrpcService, ledger_server: GrpcService, tmp_path: Path
) -> AsyncIterator[
    tuple[doorman_pb2_grpc.DoormanServiceStub, ledger_pb2_grpc.LedgerServiceStub, GrpcService]
]:
    from doorman.app import build_app

    settings = mesh_settings(tmp_path)
    settings.doorman.inference_local = address(inference_server)
    settings.doorman.ledger = address(ledger_server)
    registry = CollectorRegistry()
    endpoint = settings.doorman.endpoint.model_copy(update={"port": 0, "metrics_port": 0})
    async with (
        GrpcService(
            "doorman",
            build_app(settings.doorman, runtime(settings, registry)),
            endpoint,
            settings.telemetry,
            registry,
        ) as service,
        grpc.aio.insecure_channel(address(service)) as channel,
        grpc.aio.insecure_channel(address(ledger_server)) as ledger_channel,
    ):
        yield (
            doorman_pb2_grpc.DoormanServiceStub(channel),
            ledger_pb2_grpc.LedgerServiceStub(ledger_channel),
            service,
        )


async def test_doorman_chat_forwards_and_records_without_text(
    doorman: tuple[
        doorman_pb2_grpc.DoormanServiceStub, ledger_pb2_grpc.LedgerServiceStub, GrpcService
    ],
) -> None:
    stub, ledger, service = doorman
    secret = "my colleague Zebulon"
    request = doorman_pb2.ChatRequest(
        model=DEFAULT_MODEL,
        messages=[types_pb2.ChatMessage(role=types_pb2.ROLE_USER, content=f"Greet {secret}.")],
        sampling=types_pb2.SamplingParams(max_tokens=6, seed=2),
    )
    responses = [r async for r in stub.Chat(request, metadata=(("x-request-id", "req-abc"),))]
    end = responses[-1].end
    assert end.tier == types_pb2.TIER_LOCAL
    assert end.upstream
    text = "".join(r.delta.text for r in responses[:-1])
    # The ledger write is off the token path; drain it before looking.
    await service.app.doorman.drain()  # type: ignore[attr-defined]
    records = (await ledger.List(ledger_pb2.ListRequest())).records
    assert len(records) == 1
    entry = records[0].entry
    assert (entry.request_id, entry.operation, entry.model) == ("req-abc", "Chat", DEFAULT_MODEL)
    assert entry.completion_tokens == end.usage.completion_tokens
    assert entry.status_code == 0
    assert "Zebulon" not in str(records[0])
    if text.strip():
        assert text.strip() not in str(records[0])


async def test_doorman_passes_errors_and_records_them(
    doorman: tuple[
        doorman_pb2_grpc.DoormanServiceStub, ledger_pb2_grpc.LedgerServiceStub, GrpcService
    ],
) -> None:
    stub, ledger, service = doorman
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        [r async for r in stub.Complete(doorman_pb2.CompleteRequest(model="nope", prompt="x"))]
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert from_rpc_error(caught.value).field == "model"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        [r async for r in stub.Chat(doorman_pb2.ChatRequest(model=DEFAULT_MODEL))]
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    await service.app.doorman.drain()  # type: ignore[attr-defined]
    records = (await ledger.List(ledger_pb2.ListRequest())).records
    assert [r.entry.status_code for r in records] == [grpc.StatusCode.NOT_FOUND.value[0]]


async def test_doorman_deadline_reaches_the_engine(
    doorman: tuple[
        doorman_pb2_grpc.DoormanServiceStub, ledger_pb2_grpc.LedgerServiceStub, GrpcService
    ],
) -> None:
    stub, _, _ = doorman
    request = doorman_pb2.CompleteRequest(
        model=DEFAULT_MODEL,
        prompt="Count: one, two,",
        sampling=types_pb2.SamplingParams(max_tokens=1500),
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        [r async for r in stub.Complete(request, timeout=0.5)]
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


async def test_doorman_lists_models(
    doorman: tuple[
        doorman_pb2_grpc.DoormanServiceStub, ledger_pb2_grpc.LedgerServiceStub, GrpcService
    ],
) -> None:
    stub, _, _ = doorman
    reply = await stub.ListModels(doorman_pb2.DoormanServiceListModelsRequest())
    assert [m.name for m in reply.models] == [DEFAULT_MODEL]
