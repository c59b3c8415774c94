"""LoRA adapters in inference-local, resolved through a real adapter registry server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from helpers import DEFAULT_MODEL, SHARED_MODELS_DIR, mesh_settings, runtime
from lora_fixture import make_lora_gguf
from prometheus_client import CollectorRegistry

from inference_local.adapters import RegistryAdapters
from inference_local.config import InferenceLocalConfig, ModelConfig
from inference_local.engine import Delta, Engine, Request
from inference_local.sampling import Sampling
from slm.config import DiscoveryConfig, TelemetryConfig
from slm.discovery import Connector
from slm.errors import InvalidArgument, NotFound
from slm.server import GrpcService
from slm.v1 import adapters_pb2, adapters_pb2_grpc

PROMPT = "The capital of France is"


@pytest.fixture
async def engine(model_path: Path, tmp_path: Path) -> AsyncIterator[Engine]:
    from adapters.app import build_app

    settings = mesh_settings(tmp_path)
    registry = CollectorRegistry()
    endpoint = settings.adapters.endpoint.model_copy(update={"port": 0, "metrics_port": 0})
    async with GrpcService(
        "adapters",
        build_app(settings.adapters, runtime(settings, registry)),
        endpoint,
        settings.telemetry,
        registry,
    ) as service:
        address = f"127.0.0.1:{service.port}"
        connector = Connector(DiscoveryConfig(), TelemetryConfig())
        resolver = RegistryAdapters(connector, address)
        import grpc

        async with grpc.aio.insecure_channel(address) as channel:
            stub = adapters_pb2_grpc.AdapterRegistryServiceStub(channel)
            for name, seed in (("tone-a", 1), ("tone-b", 2)):
                path = make_lora_gguf(model_path, tmp_path / f"{name}.gguf", scale=0.1, seed=seed)
                await stub.RegisterAdapter(
                    adapters_pb2.RegisterAdapterRequest(
                        name=name,
                        base_model=DEFAULT_MODEL,
                        format=adapters_pb2.ADAPTER_FORMAT_GGUF,
                        source=str(path),
                    )
                )
        config = InferenceLocalConfig(
            models_dir=SHARED_MODELS_DIR,
            keep_alive_s=0,
            parallel=4,
            models=[
                ModelConfig(name=DEFAULT_MODEL, path="gemma-3-270m-q4_k_m.gguf", context_length=256)
            ],
        )
        e = Engine(config, CollectorRegistry(), resolver)
        await e.start()
        yield e
        await e.close()
        await resolver.close()
        await connector.close()


async def text(
    engine: Engine, model: str = DEFAULT_MODEL, adapter: str = "", scale: float | None = None
) -> str:
    request = Request(
        model,
        Sampling(max_tokens=12, temperature=0),
        prompt=PROMPT,
        adapter=adapter,
        adapter_scale=scale,
    )
    return "".join([e.text async for e in engine.generate(request) if isinstance(e, Delta)])


async def test_adapter_changes_output_and_scale_zero_is_the_base(engine: Engine) -> None:
    base = await text(engine)
    tuned = await text(engine, adapter="tone-a")
    assert tuned != base
    assert await text(engine, adapter="tone-a", scale=0.0) == base
    # "base:adapter" names the adapter inline.
    assert await text(engine, model=f"{DEFAULT_MODEL}:tone-a") == tuned


async def test_different_adapters_batched_together_match_their_solo_runs(engine: Engine) -> None:
    solo = [await text(engine, adapter=a) for a in ("", "tone-a", "tone-b")]
    together = await asyncio.gather(*(text(engine, adapter=a) for a in ("", "tone-a", "tone-b")))
    assert list(together) == solo
    assert len(set(solo)) == 3


async def test_unknown_adapter_and_wrong_base(engine: Engine) -> None:
    with pytest.raises(NotFound):
        await text(engine, adapter="nope")
    with pytest.raises(InvalidArgument):
        await text(engine, adapter="tone-a", scale=float("nan"))
