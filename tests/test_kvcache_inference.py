"""inference-local with prefix caching on the real default model: a restored prefix gives the
same text as a full prefill at temperature 0, from this process's memory and from the kv-cache
service (a second replica), and a state is used only with the model and adapter set that
made it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from helpers import DEFAULT_MODEL, SHARED_MODELS_DIR, runtime
from lora_fixture import make_lora_gguf
from prometheus_client import CollectorRegistry

from inference_local.config import InferenceLocalConfig, ModelConfig
from inference_local.engine import Adapter, Delta, Engine, Request
from inference_local.prefix_cache import (
    KVCacheClient,
    PrefixCache,
    PrefixCacheMetrics,
    block_hashes,
)
from inference_local.sampling import Sampling
from kvcache.app import build_app
from kvcache.config import KVCacheConfig
from mesh.settings import Settings
from slm.config import ServiceEndpoint
from slm.server import GrpcService

DOCUMENT = " ".join(
    f"Clause {i}: the tenant pays {i * 7} euros on day {i % 28 + 1} of each month."
    for i in range(1, 19)
)
PROMPT = f"Read this contract.\n{DOCUMENT}\nQuestion: how much is paid under clause 3? Answer:"
OTHER = f"Read this contract.\n{DOCUMENT}\nQuestion: on which day is clause 5 paid? Answer:"
BLOCK = 64


@dataclass
class Replica:
    engine: Engine
    cache: PrefixCache
    metrics: PrefixCacheMetrics


def config() -> InferenceLocalConfig:
    # Batch-invariant: the texts compared here come from differently batched runs.
    return InferenceLocalConfig(
        models_dir=SHARED_MODELS_DIR,
        keep_alive_s=0,
        parallel=2,
        batch_invariant=True,
        models=[
            ModelConfig(name=DEFAULT_MODEL, path="gemma-3-270m-q4_k_m.gguf", context_length=1024)
        ],
    )


@pytest.fixture(scope="module")
async def kv_service(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[GrpcService]:
    settings = Settings(
        kv_cache=KVCacheConfig(
            endpoint=ServiceEndpoint(port=0, metrics_port=0),
            disk_dir=tmp_path_factory.mktemp("kv"),
        )
    )
    registry = CollectorRegistry()
    app = build_app(settings.kv_cache, runtime(settings, registry))
    async with GrpcService(
        "kv-cache", app, settings.kv_cache.endpoint, settings.telemetry, registry
    ) as service:
        yield service


@pytest.fixture(scope="module")
def adapter_file(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_lora_gguf(model_path, tmp_path_factory.mktemp("lora") / "tone.gguf", seed=3)


async def start_replica(service: GrpcService | None, adapter: Path) -> Replica:
    async def resolve(name: str) -> Adapter:
        return Adapter(adapter, 0.5, DEFAULT_MODEL)

    registry = CollectorRegistry()
    metrics = PrefixCacheMetrics(registry)
    client = (
        KVCacheClient(grpc.aio.insecure_channel(f"127.0.0.1:{service.port}")) if service else None
    )
    cache = PrefixCache(BLOCK, 256 << 20, client, metrics)
    engine = Engine(config(), registry, resolve, cache)
    await engine.start()
    return Replica(engine, cache, metrics)


async def stop(replica: Replica) -> None:
    await replica.engine.close()
    await replica.cache.close()


@pytest.fixture(scope="module")
async def plain() -> AsyncIterator[Engine]:
    engine = Engine(config(), CollectorRegistry())
    await engine.start()
    yield engine
    await engine.close()


@pytest.fixture(scope="module")
async def first(kv_service: GrpcService, adapter_file: Path) -> AsyncIterator[Replica]:
    replica = await start_replica(kv_service, adapter_file)
    yield replica
    await stop(replica)


async def text(engine: Engine, prompt: str, adapter: str = "", max_tokens: int = 16) -> str:
    sampling = Sampling(max_tokens=max_tokens, temperature=0)
    request = Request(DEFAULT_MODEL, sampling, prompt=prompt, adapter=adapter)
    return "".join([e.text async for e in engine.generate(request) if isinstance(e, Delta)])


def count(metric: object, *labels: str) -> float:
    return float(metric.labels(*labels)._value.get())  # type: ignore[attr-defined]


async def test_warm_output_is_identical_to_cold_and_to_no_cache(
    plain: Engine, first: Replica, kv_service: GrpcService, adapter_file: Path
) -> None:
    reference = await text(plain, PROMPT)
    assert reference
    m = first.metrics
    assert await text(first.engine, PROMPT) == reference  # cold: snapshots as it prefills
    assert count(m.requests, DEFAULT_MODEL, "miss") == 1
    await first.cache.flush()
    assert await text(first.engine, PROMPT) == reference  # warm, from its own memory
    assert count(m.requests, DEFAULT_MODEL, "memory") == 1
    saved = count(m.hits, DEFAULT_MODEL, "memory")
    assert saved >= BLOCK
    assert saved % BLOCK == 0
    # Another question over the same document restores the shared part only.
    other = await text(plain, OTHER)
    assert await text(first.engine, OTHER) == other
    assert count(m.requests, DEFAULT_MODEL, "memory") == 2
    await first.cache.flush()
    # Restored sequences batched together with one that waits for a slot. After a restored
    # prefix the prompt's tail is read in other chunks than a cold prefill reads it, and
    # llama.cpp's CPU attention picks its kernel by chunk size, so later tokens may drift from
    # the uncached text by rounding: the first token, from the prefill, is compared.
    hits = count(m.requests, DEFAULT_MODEL, "memory")
    batched = await asyncio.gather(
        *(text(first.engine, p, max_tokens=1) for p in (PROMPT, OTHER, PROMPT))
    )
    assert count(m.requests, DEFAULT_MODEL, "memory") == hits + 3
    solo = [await text(plain, p, max_tokens=1) for p in (PROMPT, OTHER)]
    assert batched == [solo[0], solo[1], solo[0]]

    # A second replica, with nothing in its own memory, restores from the kv-cache service.
    second = await start_replica(kv_service, adapter_file)
    try:
        assert await text(second.engine, PROMPT) == reference
        assert count(second.metrics.requests, DEFAULT_MODEL, "service") == 1
        assert count(second.metrics.hits, DEFAULT_MODEL, "service") == saved
    finally:
        await stop(second)


async def test_a_state_is_used_only_with_its_model_and_adapter_set(
    plain: Engine, first: Replica
) -> None:
    m = first.metrics
    await text(first.engine, PROMPT)  # the base model's states are cached by now
    misses, hits = (
        count(m.requests, DEFAULT_MODEL, "miss"),
        count(m.requests, DEFAULT_MODEL, "memory"),
    )
    tuned = await text(first.engine, PROMPT, adapter="tone")
    assert count(m.requests, DEFAULT_MODEL, "miss") == misses + 1
    await first.cache.flush()
    assert await text(first.engine, PROMPT, adapter="tone") == tuned
    assert count(m.requests, DEFAULT_MODEL, "memory") == hits + 1
    assert await text(first.engine, PROMPT) == await text(plain, PROMPT)


async def test_a_state_llama_cpp_refuses_is_a_full_prefill(
    plain: Engine, kv_service: GrpcService, adapter_file: Path, model_path: Path
) -> None:
    replica = await start_replica(kv_service, adapter_file)
    try:
        engine = replica.engine
        tokens = await engine.tokenize(DEFAULT_MODEL, PROMPT, add_special=True)
        hashes = block_hashes(tokens[: len(tokens) - 1], BLOCK)
        fingerprint = await replica.cache.fingerprint(model_path, [])
        # Well-formed for the service (its checksum matches), garbage for llama.cpp.
        client = KVCacheClient(grpc.aio.insecure_channel(f"127.0.0.1:{kv_service.port}"))
        await client.put(fingerprint, hashes[-1], len(hashes) * BLOCK, b"\x07" * 4096)
        await client.close()
        assert await text(engine, PROMPT) == await text(plain, PROMPT)
        assert count(replica.metrics.requests, DEFAULT_MODEL, "service") == 1
        # The full prefill replaced the refused entry with a good state.
        await replica.cache.flush()
        client = KVCacheClient(grpc.aio.insecure_channel(f"127.0.0.1:{kv_service.port}"))
        replaced = await client.get(fingerprint, hashes[-1])
        await client.close()
        assert replaced is not None
        assert len(replaced) > 4096
    finally:
        await stop(replica)
