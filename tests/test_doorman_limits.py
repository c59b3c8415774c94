"""Tenants and limits: API keys, token buckets (in memory and in real Redis), tier queues."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from helpers import DEFAULT_MODEL, free_port, mesh_settings, runtime
from prometheus_client import CollectorRegistry

from doorman.auth import Tenant, hash_api_key
from doorman.config import DoormanConfig, TenantConfig
from doorman.limits import (
    MemoryBuckets,
    QueueFull,
    RateLimited,
    RedisBuckets,
    TenantLimiter,
    TierQueue,
)
from slm.config import ServiceEndpoint
from slm.errors import ResourceExhausted, Unavailable, from_rpc_error
from slm.server import GrpcService
from slm.v1 import doorman_pb2, doorman_pb2_grpc, types_pb2


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def test_rpm_bucket_refuses_with_the_time_until_a_token_is_back() -> None:
    clock = Clock()
    limiter = TenantLimiter(MemoryBuckets(clock))
    tenant = Tenant("t", rpm=2)
    await limiter.admit(tenant)
    await limiter.admit(tenant)
    with pytest.raises(RateLimited) as caught:
        await limiter.admit(tenant)
    # Two a minute: one token every 30 s.
    assert caught.value.retry_after_s == pytest.approx(30)
    clock.now += 30
    await limiter.admit(tenant)


async def test_tpm_is_charged_after_the_answer_and_blocks_until_repaid() -> None:
    clock = Clock()
    limiter = TenantLimiter(MemoryBuckets(clock))
    tenant = Tenant("t", tpm=600)
    await limiter.admit(tenant)
    await limiter.charge(tenant, 900)  # more than the bucket: it goes into debt
    with pytest.raises(RateLimited) as caught:
        await limiter.admit(tenant)
    # 300 in debt, plus the one token admission needs, at 10 tokens a second.
    assert caught.value.retry_after_s == pytest.approx(30.1)


async def test_max_concurrent_refuses_at_once_and_frees_on_release() -> None:
    limiter = TenantLimiter(MemoryBuckets())
    tenant = Tenant("t", max_concurrent=1)
    await limiter.admit(tenant)
    with pytest.raises(ResourceExhausted) as caught:
        await limiter.admit(tenant)
    assert caught.value.retry_after_s == 1
    limiter.release(tenant)
    await limiter.admit(tenant)


async def test_tier_queue_serves_higher_priority_first_and_refuses_when_full() -> None:
    queue = TierQueue("local", max_concurrent=1, max_queue=2)
    await queue.acquire(priority=0)
    served: list[str] = []

    async def wait(name: str, priority: int) -> None:
        await queue.acquire(priority)
        served.append(name)

    low = asyncio.create_task(wait("low", 1))
    high = asyncio.create_task(wait("high", 5))
    await asyncio.sleep(0)  # one turn of the loop: both tasks run up to their wait
    assert queue.depth == 2
    with pytest.raises(QueueFull) as caught:
        await queue.acquire(priority=100)
    assert caught.value.retry_after_s is not None
    queue.release()
    await high
    assert served == ["high"]
    queue.release()
    await low
    assert served == ["high", "low"]


async def test_a_waiter_that_leaves_gives_its_place_back() -> None:
    queue = TierQueue("local", max_concurrent=1, max_queue=1)
    await queue.acquire(0)
    waiter = asyncio.create_task(queue.acquire(0))
    await asyncio.sleep(0)
    assert queue.depth == 1
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert queue.depth == 0
    queue.release()
    await queue.acquire(0)  # the slot is free again, not lost to the cancelled waiter


@pytest.fixture
async def replicas(redis_url: str) -> AsyncIterator[tuple[TenantLimiter, TenantLimiter]]:
    """Two Doorman replicas' limiters, each with its own connection to one Redis."""
    first, second = RedisBuckets(redis_url), RedisBuckets(redis_url)
    await first._client.flushdb()
    yield TenantLimiter(first), TenantLimiter(second)
    await first.close()
    await second.close()


async def test_replicas_share_one_request_limit_in_redis(
    replicas: tuple[TenantLimiter, TenantLimiter],
) -> None:
    a, b = replicas
    tenant = Tenant("shared", rpm=3)
    await a.admit(tenant)
    await b.admit(tenant)
    await a.admit(tenant)
    for replica in (a, b):
        with pytest.raises(RateLimited) as caught:
            await replica.admit(tenant)
        assert caught.value.retry_after_s is not None
        assert 0 < caught.value.retry_after_s <= 20


async def test_replicas_share_token_debt_in_redis(
    replicas: tuple[TenantLimiter, TenantLimiter],
) -> None:
    a, b = replicas
    tenant = Tenant("tokens", tpm=60)
    await a.admit(tenant)
    await a.charge(tenant, 120)
    with pytest.raises(RateLimited) as caught:
        await b.admit(tenant)
    assert caught.value.retry_after_s is not None
    assert caught.value.retry_after_s > 55  # ~60 tokens of debt at one token a second


async def test_redis_down_is_unavailable_not_unlimited() -> None:
    limiter = TenantLimiter(RedisBuckets(f"redis://127.0.0.1:{free_port()}/0"))
    with pytest.raises(Unavailable) as caught:
        await limiter.admit(Tenant("t", rpm=5))
    assert caught.value.reason == "LIMITS_UNAVAILABLE"


KEY = "sk-test-tenant-key"
PEPPER = "pepper-for-tests"


@pytest.fixture
async def guarded_doorman(
    inference_server: GrpcService, ledger_server: GrpcService, tmp_path: Path
) -> AsyncIterator[doorman_pb2_grpc.DoormanServiceStub]:
    from doorman.app import build_app

    settings = mesh_settings(tmp_path)
    settings.doorman = DoormanConfig(
        endpoint=ServiceEndpoint(port=0, metrics_port=0),
        inference_local=f"127.0.0.1:{inference_server.port}",
        ledger=f"127.0.0.1:{ledger_server.port}",
        key_pepper=PEPPER,
        tenants=[
            TenantConfig(
                name="acme",
                key_hashes=[hash_api_key(KEY, PEPPER)],
                allowed_models=[DEFAULT_MODEL],
                rpm=1,
            )
        ],
    )
    registry = CollectorRegistry()
    async with (
        GrpcService(
            "doorman",
            build_app(settings.doorman, runtime(settings, registry)),
            settings.doorman.endpoint,
            settings.telemetry,
            registry,
        ) as service,
        grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as channel,
    ):
        yield doorman_pb2_grpc.DoormanServiceStub(channel)


def complete(model: str = DEFAULT_MODEL) -> doorman_pb2.CompleteRequest:
    return doorman_pb2.CompleteRequest(
        model=model, prompt="Hello", sampling=types_pb2.SamplingParams(max_tokens=2)
    )


async def test_keys_tenants_and_rate_limits_over_grpc(
    guarded_doorman: doorman_pb2_grpc.DoormanServiceStub,
) -> None:
    stub = guarded_doorman
    auth = (("authorization", f"Bearer {KEY}"),)
    for metadata, code in [
        ((), grpc.StatusCode.UNAUTHENTICATED),
        ((("authorization", "Bearer wrong"),), grpc.StatusCode.UNAUTHENTICATED),
    ]:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            [r async for r in stub.Complete(complete(), metadata=metadata)]
        assert caught.value.code() == code
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        [r async for r in stub.Complete(complete("other-model"), metadata=auth)]
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    responses = [r async for r in stub.Complete(complete(), metadata=auth)]
    assert responses[-1].HasField("end")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        [r async for r in stub.Complete(complete(), metadata=auth)]
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    error = from_rpc_error(caught.value)
    assert error.reason == "RATE_LIMITED"
    assert error.retry_after_s is not None
    assert error.retry_after_s > 0
    models = await stub.ListModels(doorman_pb2.DoormanServiceListModelsRequest(), metadata=auth)
    assert [m.name for m in models.models] == [DEFAULT_MODEL]


def test_auth_off_is_refused_off_loopback() -> None:
    with pytest.raises(ValueError, match="only while it listens on loopback"):
        DoormanConfig(endpoint=ServiceEndpoint(host="0.0.0.0", port=1, metrics_port=2))
    tenant = TenantConfig(name="t", key_hashes=[hash_api_key("k")])
    assert DoormanConfig(
        endpoint=ServiceEndpoint(host="0.0.0.0", port=1, metrics_port=2), tenants=[tenant]
    ).auth_enabled
