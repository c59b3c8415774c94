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
from dataclasses import dataclass
from pathlib import Path

import grpc
from conftest import port0
from helpers import DEFAULT_MODEL, LlamaServer, free_port, mesh_settings, runtime, until
from prometheus_client import CollectorRegistry

from doorman.config import RouteConfig, RouteStep, RoutingConfig
from inference_remote.app import InferenceRemoteApp
from inference_remote.config import InferenceRemoteConfig, RemoteModelConfig, UpstreamConfig
from slm.config import DiscoveryConfig, TelemetryConfig
from slm.discovery import Connector
from slm.server import GrpcService
from slm.v1 import doorman_pb2, doorman_pb2_grpc, ledger_pb2, ledger_pb2_grpc, types_pb2


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


@dataclass
class Doorman:
    stub: doorman_pb2_grpc.DoormanServiceStub
    service: GrpcService
    registry: CollectorRegistry

    def demand(self, tier: str) -> float:
        value = self.registry.get_sample_value(
            "slm_doorman_tier_demand", {"tier": tier, "model": DEFAULT_MODEL}
        )
        return value or 0.0


@contextlib.asynccontextmanager
async def doorman(
    tmp_path: Path, ledger: GrpcService, remote: str, local: str, wait_s: float
) -> AsyncIterator[Doorman]:
    from doorman.app import build_app

    settings = mesh_settings(tmp_path)
    routing = RoutingConfig(
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
    settings.doorman = settings.doorman.model_copy(
        update={
            "ledger": f"127.0.0.1:{ledger.port}",
            "inference_local": local,
            "routing": routing,
        }
    )
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
        grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as channel,
    ):
        yield Doorman(doorman_pb2_grpc.DoormanServiceStub(channel), service, registry)


def chat() -> doorman_pb2.ChatRequest:
    return doorman_pb2.ChatRequest(
        model="burst",
        messages=[types_pb2.ChatMessage(role=types_pb2.ROLE_USER, content="Say hello.")],
        sampling=types_pb2.SamplingParams(max_tokens=4, temperature=0),
    )


async def ledger_entries(ledger: GrpcService, door: Doorman) -> list[ledger_pb2.LedgerEntry]:
    await door.service.app.doorman.drain()  # type: ignore[attr-defined]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{ledger.port}") as channel:
        records = await ledger_pb2_grpc.LedgerServiceStub(channel).List(ledger_pb2.ListRequest())
    return [record.entry for record in records.records]


async def test_a_request_waits_for_a_pool_that_starts_and_is_served_there(
    model_path: Path,
    inference_server: GrpcService,
    ledger_server: GrpcService,
    tmp_path: Path,
) -> None:
    pool_port = free_port()
    local = f"127.0.0.1:{inference_server.port}"
    pool: LlamaServer | None = None
    async with (
        remote_tier(pool_port) as remote,
        doorman(tmp_path, ledger_server, remote, local, wait_s=300) as door,
    ):
        answer = asyncio.create_task(_responses(door.stub.Chat(chat())))
        try:
            # The request waits for the absent pool, and says so to the autoscaler.
            await until(lambda: door.demand("TIER_GPU") == 1)
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
        assert door.demand("TIER_GPU") == 0
        (entry,) = await ledger_entries(ledger_server, door)
    # Waiting for a starting pool is not a fallback, and not a failure for its breaker.
    assert list(entry.policy_decisions) == []


async def test_a_pool_that_does_not_come_falls_back_after_the_wait(
    inference_server: GrpcService, ledger_server: GrpcService, tmp_path: Path
) -> None:
    local = f"127.0.0.1:{inference_server.port}"
    async with (
        remote_tier(free_port()) as remote,
        doorman(tmp_path, ledger_server, remote, local, wait_s=1.0) as door,
    ):
        for _ in range(2):
            responses = await _responses(door.stub.Chat(chat()))
            assert responses[-1].end.tier == types_pb2.TIER_LOCAL
        assert door.demand("TIER_GPU") == 0
        assert door.demand("TIER_LOCAL") == 0
        entries = await ledger_entries(ledger_server, door)
    # The first request waited its bound, then fell back; that one failure (breaker_failures=1)
    # opened the pool's breaker, so the second went on at once.
    assert [list(e.policy_decisions) for e in entries] == [
        [f"fallback:TIER_GPU:{remote}:UNAVAILABLE", f"try:TIER_LOCAL:{local}"],
        [f"breaker_open:TIER_GPU:{remote}", f"try:TIER_LOCAL:{local}"],
    ]


async def _responses(call: object) -> list[doorman_pb2.ChatResponse]:
    return [response async for response in call]  # type: ignore[attr-defined]
