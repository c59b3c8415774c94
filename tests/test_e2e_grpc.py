"""gRPC clients through Envoy: the Doorman's stub, health and reflection."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from helpers import DEFAULT_MODEL, Mesh

from slm.v1 import doorman_pb2, doorman_pb2_grpc, types_pb2

pytestmark = pytest.mark.e2e


async def test_doorman_stub_through_envoy(mesh: Mesh) -> None:
    async with grpc.aio.insecure_channel(mesh.grpc_target) as channel:
        stub = doorman_pb2_grpc.DoormanServiceStub(channel)
        request = doorman_pb2.ChatRequest(
            model=DEFAULT_MODEL,
            messages=[types_pb2.ChatMessage(role=types_pb2.ROLE_USER, content="Hello!")],
            sampling=types_pb2.SamplingParams(max_tokens=8),
        )
        responses = [r async for r in stub.Chat(request)]
        assert responses[-1].WhichOneof("event") == "end"
        assert responses[-1].end.usage.completion_tokens > 0
        assert all(r.WhichOneof("event") == "delta" for r in responses[:-1])

        with pytest.raises(grpc.aio.AioRpcError) as caught:
            [r async for r in stub.Complete(doorman_pb2.CompleteRequest(model="x", prompt="y"))]
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_health_and_reflection_through_envoy(mesh: Mesh) -> None:
    async with grpc.aio.insecure_channel(mesh.grpc_target) as channel:
        health = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="slm.v1.DoormanService")
        )
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        requests = [
            reflection_pb2.ServerReflectionRequest(list_services=""),
            reflection_pb2.ServerReflectionRequest(file_containing_symbol="slm.v1.DoormanService"),
        ]
        answers = [a async for a in reflection.ServerReflectionInfo(iter(requests))]
        names = {s.name for s in answers[0].list_services_response.service}
        assert "slm.v1.DoormanService" in names
        # The descriptors come with it, so tools like grpcurl can call the service.
        assert answers[1].file_descriptor_response.file_descriptor_proto
