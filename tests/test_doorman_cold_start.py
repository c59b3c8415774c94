"""A Tier B pool scaled to zero: the Doorman waits (bounded) for it to start, counting the request
in the demand an autoscaler reads, and falls back along the chain when it does not come.

Real processes: inference-remote in this process, pointed at a loopback port where llama.cpp's
OpenAI server (the stand-in for a vLLM pool) starts only while a request waits, and a real
inference-local as the next tier.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

from conftest import port0
from helpers import DEFAULT_MODEL, LlamaServer, free_port, until
from prometheus_client import CollectorRegistry
from test_doorman_routing import address, chat, doorman_for, ledger_entries, routed_settings

from doorman.config import RouteConfig, RouteStep, RoutingConfig
from inference_remote.app import InferenceRemoteApp
from inference_remote.config import InferenceRemoteConfig, RemoteModelConfig, UpstreamConfig
from slm.config import DiscoveryConfig, TelemetryConfig
from slm.discovery import Connector
from slm.server import GrpcService
from slm.v1 import doorman_pb2, types_pb2


@contextlib.asynccontextmanager
async def remote_tier(pool_port: int) -> AsyncIterator[str]:
    """inference-remote serving the default model from a pool at `pool_port`; its address."""
    config = InferenceRemoteConfig(
        models=[
            RemoteModelConfig(
                name=DEFAULT_MODEL,
                upstreams=[
                    UpstreamConfig(name="pool", url=f"http://127.0.0.1:{pool_port}/v1", kind="vllm")
                ],
            )
        ],
        # It notices the pool coming up within a fraction of a second.
        health_interval_s=0.2,
        adapter_registry="",
    )
    metrics = CollectorRegistry()
    app = InferenceRemoteApp(config, Connector(DiscoveryConfig(), TelemetryConfig()), metrics)
    async with GrpcService(
        "inference-remote", app, port0(config.endpoint), TelemetryConfig(), metrics
    ) as service:
        yield f"127.0.0.1:{service.port}"


def demand(doorman: GrpcService, tier: str) -> float:
    """The Doorman's slm_doorman_tier_demand for the default model on `tier`."""
    value = doorman.registry.get_sample_value(
        "slm_doorman_tier_demand", {"tier": tier, "model": DEFAULT_MODEL}
    )
    return value or 0.0


def burst_routing(remote: str, local: str, wait_s: float) -> RoutingConfig:
    """Model "burst": the pool behind inference-remote (which may be cold), then Tier A."""
    return RoutingConfig(
        routes=[
            RouteConfig(
                model="burst",
                chain=[
                    RouteStep(
                        tier="gpu", upstream=remote, model=DEFAULT_MODEL, cold_start_wait_s=wait_s
                    ),
                    RouteStep(tier="local", upstream=local, model=DEFAULT_MODEL),
                ],
            )
        ],
        retry_max_backoff_s=0.2,
        breaker_failures=1,
        breaker_reset_s=600,
    )


async def test_a_request_waits_for_a_pool_that_starts_and_is_served_there(
    model_path: Path,
    inference_server: GrpcService,
    ledger_server: GrpcService,
    tmp_path: Path,
) -> None:
    pool_port = free_port()
    local = address(inference_server)
    pool: LlamaServer | None = None
    async with remote_tier(pool_port) as remote:
        routing = burst_routing(remote, local, wait_s=300)
        async with doorman_for(routed_settings(tmp_path, ledger_server, routing, local)) as (
            stub,
            door,
        ):
            answer = asyncio.create_task(_responses(stub.Chat(chat("burst"))))
            try:
                # The request waits for the absent pool, and says so to the autoscaler.
                await until(lambda: demand(door, "TIER_GPU") == 1)
                assert not answer.done()
                # The pool comes up (as KEDA would scale it from zero); the waiting request is
                # served there, not by the next tier.
                pool = await asyncio.to_thread(
                    LlamaServer, model_path, tmp_path / "pool.log", None, pool_port
                )
                responses = await answer
            finally:
                answer.cancel()
                if pool is not None:
                    pool.kill()
            end = responses[-1].end
            assert end.tier == types_pb2.TIER_GPU
            assert end.upstream == remote
            assert demand(door, "TIER_GPU") == 0
            (entry,) = await ledger_entries(ledger_server, door)
    # Waiting for a starting pool is not a fallback, and not a failure for its breaker.
    assert list(entry.policy_decisions) == []


async def test_a_pool_that_does_not_come_falls_back_after_the_wait(
    inference_server: GrpcService, ledger_server: GrpcService, tmp_path: Path
) -> None:
    local = address(inference_server)
    async with remote_tier(free_port()) as remote:
        routing = burst_routing(remote, local, wait_s=1.0)
        async with doorman_for(routed_settings(tmp_path, ledger_server, routing, local)) as (
            stub,
            door,
        ):
            for _ in range(2):
                responses = await _responses(stub.Chat(chat("burst")))
                assert responses[-1].end.tier == types_pb2.TIER_LOCAL
            assert demand(door, "TIER_GPU") == 0
            assert demand(door, "TIER_LOCAL") == 0
            entries = await ledger_entries(ledger_server, door)
    # The first request waited its bound, then fell back; that one failure (breaker_failures=1)
    # opened the pool's breaker, so the second went on at once.
    assert [list(e.policy_decisions) for e in entries] == [
        [f"fallback:TIER_GPU:{remote}:UNAVAILABLE", f"try:TIER_LOCAL:{local}"],
        [f"breaker_open:TIER_GPU:{remote}", f"try:TIER_LOCAL:{local}"],
    ]


async def _responses(call: object) -> list[doorman_pb2.ChatResponse]:
    return [response async for response in call]  # type: ignore[attr-defined]
