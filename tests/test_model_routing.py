"""Connector.model_channel: a request for a model that only some replicas hold goes to those;
one every replica holds is balanced over all of them. Two real inference-local servers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from helpers import DEFAULT_MODEL, SHARED_MODELS_DIR, mesh_settings, runtime
from prometheus_client import CollectorRegistry

from inference_local.app import build_app
from slm.config import DiscoveryConfig, ServiceEndpoint, TelemetryConfig
from slm.discovery import Connector
from slm.server import GrpcService
from slm.v1 import inference_pb2, inference_pb2_grpc, types_pb2

ONLY_ON_SECOND = "gemma-only-on-second"


@pytest.fixture
async def replicas(
    model_path: Path, tmp_path: Path
) -> AsyncIterator[list[tuple[GrpcService, CollectorRegistry]]]:
    """Two inference-local servers: both serve DEFAULT_MODEL, only the second ONLY_ON_SECOND."""
    served = []
    for index, extra in enumerate(([], [ONLY_ON_SECOND])):
        settings = mesh_settings(tmp_path / f"replica{index}")
        config = settings.inference_local
        base = config.models[0]
        config.models = [
            base,
            *(base.model_copy(update={"name": name, "chat_template": None}) for name in extra),
        ]
        config.models_dir = SHARED_MODELS_DIR
        config.parallel = 2
        config.adapter_registry = ""
        registry = CollectorRegistry()
        served.append((settings, registry, build_app(config, runtime(settings, registry))))
    async with (
        GrpcService("a", served[0][2], port0(), TelemetryConfig(), served[0][1]) as first,
        GrpcService("b", served[1][2], port0(), TelemetryConfig(), served[1][1]) as second,
    ):
        yield [(first, served[0][1]), (second, served[1][1])]


def port0() -> ServiceEndpoint:
    return ServiceEndpoint(port=0, metrics_port=0)


def finished(registry: CollectorRegistry, model: str) -> float:
    return sum(
        sample.value
        for metric in registry.collect()
        if metric.name == "slm_engine_requests"
        for sample in metric.samples
        if sample.name == "slm_engine_requests_total" and sample.labels["model"] == model
    )


async def generate(stub: inference_pb2_grpc.InferenceServiceStub, model: str) -> None:
    request = inference_pb2.GenerateRequest(
        model=model,
        prompt="The sky is",
        sampling=types_pb2.SamplingParams(max_tokens=2, temperature=0),
    )
    async for _ in stub.Generate(request, timeout=120):
        pass


async def test_requests_go_to_the_replicas_that_hold_their_model(
    replicas: list[tuple[GrpcService, CollectorRegistry]],
) -> None:
    address = ",".join(f"127.0.0.1:{service.port}" for service, _ in replicas)
    connector = Connector(DiscoveryConfig(), TelemetryConfig())
    try:
        channel = connector.model_channel(address)
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        # The channel learns each replica's models from ListModels in the background.
        await asyncio.wait_for(channel.refresh(), 30)
        for _ in range(4):
            await generate(stub, ONLY_ON_SECOND)
        for _ in range(4):
            await generate(stub, DEFAULT_MODEL)
    finally:
        await connector.close()
    (_, first), (_, second) = replicas
    assert finished(first, ONLY_ON_SECOND) == 0
    assert finished(second, ONLY_ON_SECOND) == 4
    # Held by both: balanced over both (the first call may go out while only one replica's
    # connection is ready; the rest alternate).
    assert finished(first, DEFAULT_MODEL) >= 1
    assert finished(second, DEFAULT_MODEL) >= 1
    assert finished(first, DEFAULT_MODEL) + finished(second, DEFAULT_MODEL) == 4
