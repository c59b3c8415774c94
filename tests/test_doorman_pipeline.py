"""The Doorman's pipeline: one fallback path for every RPC, and slots held until a request ends.

Every upstream is a real inference-local gRPC server on port 0, or a loopback port where
nothing listens (a dead upstream).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest
from helpers import DEFAULT_MODEL, free_port, mesh_settings, wait_for
from test_doorman_routing import address, chat, doorman_for, routed_settings
from test_doorman_routing import second_engine as second_engine  # a fixture

from doorman.auth import hash_api_key
from doorman.config import (
    LimitsConfig,
    RouteConfig,
    RouteStep,
    RoutingConfig,
    TenantConfig,
    TierQueueConfig,
)
from slm.errors import from_rpc_error
from slm.server import GrpcService
from slm.v1 import doorman_pb2, inference_pb2, inference_pb2_grpc

FILE = "gemma-3-270m-q4_k_m.gguf"


async def test_embed_falls_back_past_a_dead_tier_and_then_skips_its_open_breaker(
    second_engine: GrpcService, ledger_server: GrpcService, tmp_path: Path
) -> None:
    live = address(second_engine)
    async with grpc.aio.insecure_channel(live) as channel:
        await inference_pb2_grpc.InferenceServiceStub(channel).LoadModel(
            inference_pb2.LoadModelRequest(
                name="embedder", path=FILE, context_length=256, embeddings=True
            )
        )
    dead = f"127.0.0.1:{free_port()}"
    routing = RoutingConfig(
        routes=[
            RouteConfig(
                model="vectors",
                chain=[
                    RouteStep(tier="gpu", upstream=dead, model="embedder"),
                    RouteStep(tier="local", upstream=live, model="embedder"),
                ],
            )
        ],
        retry_attempts=2,
        retry_initial_backoff_s=0.01,
        breaker_failures=2,
        breaker_reset_s=600,
    )
    request = doorman_pb2.DoormanServiceEmbedRequest(model="vectors", inputs=["a cat", "a dog"])
    async with doorman_for(routed_settings(tmp_path, ledger_server, routing, live)) as (
        stub,
        service,
    ):

        def dead_tier_errors() -> float | None:
            return service.registry.get_sample_value(
                "slm_doorman_upstream_errors_total", {"tier": "TIER_GPU", "code": "UNAVAILABLE"}
            )

        first = await stub.Embed(request)
        # Two attempts at the dead tier (the retry) opened its breaker, then the live one served.
        assert dead_tier_errors() == 2
        second = await stub.Embed(request)
        # The open breaker skips the dead tier without calling it.
        assert dead_tier_errors() == 2
    for reply in (first, second):
        assert [len(e.values) for e in reply.embeddings] == [640, 640]
        assert reply.prompt_tokens > 2
    assert first.embeddings == second.embeddings


KEY, OTHER_KEY = "sk-limited-tenant", "sk-unlimited-tenant"


async def test_slots_are_held_while_a_stream_runs_and_given_back_when_the_client_leaves(
    inference_server: GrpcService, ledger_server: GrpcService, tmp_path: Path
) -> None:
    settings = mesh_settings(tmp_path)
    settings.doorman = settings.doorman.model_copy(
        update={
            "inference_local": address(inference_server),
            "ledger": address(ledger_server),
            "tenants": [
                TenantConfig(name="limited", key_hashes=[hash_api_key(KEY)], max_concurrent=1),
                TenantConfig(name="other", key_hashes=[hash_api_key(OTHER_KEY)]),
            ],
            "limits": LimitsConfig(
                tier_queues=[TierQueueConfig(tier="local", max_concurrent=1, max_queue=0)]
            ),
        }
    )
    limited = (("authorization", f"Bearer {KEY}"),)
    other = (("authorization", f"Bearer {OTHER_KEY}"),)

    async def refusal(metadata: tuple[tuple[str, str], ...]) -> str:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            [r async for r in stub.Chat(chat(DEFAULT_MODEL), metadata=metadata)]
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        return from_rpc_error(caught.value).reason

    async with doorman_for(settings) as (stub, service):
        running = stub.Chat(
            chat(DEFAULT_MODEL, "Count from one to two hundred.", max_tokens=400),
            metadata=limited,
        )
        assert (await running.read()).HasField("delta")
        # A refused request gives back no slot it never took: the next one is refused too.
        assert await refusal(limited) == "TOO_MANY_CONCURRENT"
        assert await refusal(limited) == "TOO_MANY_CONCURRENT"
        assert await refusal(other) == "QUEUE_FULL"
        running.cancel()

        def cancelled_recorded() -> bool:
            value = service.registry.get_sample_value(
                "slm_doorman_requests_total",
                {"model": DEFAULT_MODEL, "tier": "TIER_LOCAL", "code": "CANCELLED"},
            )
            return value == 1

        # The Doorman sees the cancellation on its own schedule: wait for its record, bounded.
        assert await asyncio.to_thread(wait_for, cancelled_recorded)
        # The tenant's slot and the tier's slot both came back.
        responses = [r async for r in stub.Chat(chat(DEFAULT_MODEL), metadata=limited)]
        assert responses[-1].HasField("end")
        in_flight = service.registry.get_sample_value("slm_doorman_in_flight_requests")
        assert in_flight == 0
