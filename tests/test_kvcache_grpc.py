"""KVCacheService through a real stub on port 0: streamed Put and Get, Lookup, Delete, Stats,
errors, and entries that outlive a restart of the service."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from helpers import runtime
from prometheus_client import CollectorRegistry

from inference_local.prefix_cache import KVCacheClient
from kvcache.app import build_app
from kvcache.config import KVCacheConfig
from mesh.settings import Settings
from slm.config import ServiceEndpoint
from slm.server import GrpcService
from slm.v1 import kvcache_pb2, kvcache_pb2_grpc


def kv_settings(tmp_path: Path, memory_mb: int = 64) -> Settings:
    return Settings(
        state_dir=tmp_path,
        kv_cache=KVCacheConfig(
            endpoint=ServiceEndpoint(port=0, metrics_port=0),
            memory_mb=memory_mb,
            disk_dir=tmp_path / "kv",
            disk_mb=64,
            max_entry_mb=8,
        ),
    )


async def start(settings: Settings) -> GrpcService:
    registry = CollectorRegistry()
    service = GrpcService(
        "kv-cache",
        build_app(settings.kv_cache, runtime(settings, registry)),
        settings.kv_cache.endpoint,
        settings.telemetry,
        registry,
    )
    await service.__aenter__()
    return service


@pytest.fixture
async def service(tmp_path: Path) -> AsyncIterator[GrpcService]:
    svc = await start(kv_settings(tmp_path))
    yield svc
    await svc.__aexit__(None, None, None)


def client(service: GrpcService) -> KVCacheClient:
    return KVCacheClient(grpc.aio.insecure_channel(f"127.0.0.1:{service.port}"))


async def test_put_get_lookup_delete_stats(service: GrpcService) -> None:
    kv = client(service)
    big = bytes(range(256)) * 12_000  # ~3 MiB: several chunks each way
    await kv.put("fp", "h2", 128, big)
    await kv.put("fp", "h4", 256, b"four")
    assert await kv.get("fp", "h2") == big
    assert await kv.lookup("fp", ["h1", "h2", "h3", "h4", "h5"]) == 4
    assert await kv.lookup("fp", ["h1", "h2", "h3"]) == 2
    assert await kv.lookup("other", ["h1", "h2"]) == 0
    assert await kv.get("other", "h2") is None
    stub = kvcache_pb2_grpc.KVCacheServiceStub(kv._channel)
    reply = await stub.Lookup(
        kvcache_pb2.LookupRequest(fingerprint="fp", block_hashes=["h1", "h2"])
    )
    assert reply.n_blocks == 2
    assert reply.key.block_hash == "h2"
    replies = [m async for m in stub.Get(kvcache_pb2.GetRequest(key=reply.key))]
    first = replies[0]
    assert first.sha256 == hashlib.sha256(big).hexdigest()
    assert first.tier == "memory"
    await stub.Delete(kvcache_pb2.DeleteRequest(key=reply.key))
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await stub.Delete(kvcache_pb2.DeleteRequest(key=reply.key))
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    stats = {t.name: t for t in (await stub.Stats(kvcache_pb2.StatsRequest())).tiers}
    assert stats["memory"].entries == 1
    assert stats["disk"].entries == 1
    assert stats["memory"].hits >= 2
    await kv.close()


async def test_bad_requests_are_invalid_argument(service: GrpcService) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as channel:
        stub = kvcache_pb2_grpc.KVCacheServiceStub(channel)
        key = kvcache_pb2.CacheKey(fingerprint="fp", block_hash="h")

        async def stream(
            *messages: kvcache_pb2.PutRequest,
        ) -> AsyncIterator[kvcache_pb2.PutRequest]:
            for m in messages:
                yield m

        cases = [
            stream(kvcache_pb2.PutRequest(chunk=b"x")),
            stream(kvcache_pb2.PutRequest(key=key, total_bytes=5, chunk=b"abc")),
            stream(
                kvcache_pb2.PutRequest(key=key, total_bytes=2, chunk=b"a"),
                kvcache_pb2.PutRequest(key=key, chunk=b"b"),
            ),
            stream(kvcache_pb2.PutRequest(key=kvcache_pb2.CacheKey(block_hash="h"))),
        ]
        for case in cases:
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await stub.Put(case)
            assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await stub.Put(stream(kvcache_pb2.PutRequest(key=key, total_bytes=9 << 20)))
        assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await stub.Lookup(kvcache_pb2.LookupRequest(block_hashes=["h"]))
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        # The service is still healthy after the errors.
        await stub.Put(stream(kvcache_pb2.PutRequest(key=key, total_bytes=1, chunk=b"z")))


async def test_entries_survive_a_restart_from_disk(tmp_path: Path) -> None:
    settings = kv_settings(tmp_path)
    first = await start(settings)
    kv = client(first)
    await kv.put("fp", "h1", 64, b"prefix state")
    await kv.close()
    await first.__aexit__(None, None, None)
    second = await start(settings)
    kv = client(second)
    assert await kv.lookup("fp", ["h1"]) == 1
    stub = kvcache_pb2_grpc.KVCacheServiceStub(kv._channel)
    key = kvcache_pb2.CacheKey(fingerprint="fp", block_hash="h1")
    replies = [m async for m in stub.Get(kvcache_pb2.GetRequest(key=key))]
    assert replies[0].tier == "disk"
    assert replies[0].chunk == b"prefix state"
    await kv.close()
    await second.__aexit__(None, None, None)


def test_slm_up_runs_kv_cache_only_when_inference_local_uses_it(tmp_path: Path) -> None:
    from inference_local.config import InferenceLocalConfig
    from mesh.supervisor import Supervisor

    plain = Supervisor(Settings(state_dir=tmp_path), None)
    assert "kv-cache" not in [c.name for c in plain.children]
    settings = Settings(
        state_dir=tmp_path, inference_local=InferenceLocalConfig(kv_cache="127.0.0.1:50054")
    )
    names = [c.name for c in Supervisor(settings, None).children]
    assert names.index("kv-cache") < names.index("inference-local")


async def test_slm_serve_kv_cache_as_a_process_keeps_entries_over_a_restart(
    tmp_path: Path,
) -> None:
    import asyncio
    import sys

    from helpers import free_port, to_toml

    from mesh.supervisor import grpc_serving

    settings = kv_settings(tmp_path)
    port = free_port()
    settings.kv_cache.endpoint = ServiceEndpoint(port=port, metrics_port=free_port())
    config = tmp_path / "slm.toml"
    config.write_text(to_toml(settings))
    address = f"127.0.0.1:{port}"

    async def serve() -> asyncio.subprocess.Process:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "mesh.cli", "--config", str(config), "serve", "kv-cache",
            stdin=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        while not await grpc_serving(address):
            assert process.returncode is None
            await asyncio.sleep(0.2)  # polling the health check, not synchronising on time
        return process

    process = await serve()
    kv = KVCacheClient(grpc.aio.insecure_channel(address))
    await kv.put("fp", "h1", 64, b"state")
    await kv.close()
    process.terminate()
    assert await process.wait() == 0
    process = await serve()
    kv = KVCacheClient(grpc.aio.insecure_channel(address))
    assert await kv.get("fp", "h1") == b"state"
    await kv.close()
    process.terminate()
    await process.wait()
