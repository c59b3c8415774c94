"""The Doorman and inference-local's model manifest: a model the manifest keeps on a remote tier
is refused by Tier A with MODEL_REMOTE, and the Doorman takes the next tier at once, with no
retry there and no failure for Tier A's breaker (it serves its other models on)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from helpers import DEFAULT_MODEL, mesh_settings
from test_doorman_routing import (
    address,
    chat,
    doorman_for,
    ledger_entries,
    own_engine,
    routed_settings,
)

from doorman.config import RouteConfig, RouteStep, RoutingConfig
from inference_local.config import ModelConfig
from slm.errors import from_rpc_error
from slm.server import GrpcService
from slm.v1 import types_pb2


@pytest.fixture
async def remote_here(model_path: Path, tmp_path: Path) -> AsyncIterator[GrpcService]:
    """inference-local whose manifest serves the default model and keeps "big" remote."""
    settings = mesh_settings(tmp_path / "a")
    local = settings.inference_local.models[0]
    settings.inference_local = settings.inference_local.model_copy(
        update={
            "models": [
                local,
                ModelConfig(name="big", path="big.gguf", tier="remote"),
            ],
            "parallel": 2,
            "adapter_registry": "",
        }
    )
    async with own_engine(settings, "inference-local-a") as service:
        yield service


async def test_a_remote_model_goes_to_the_next_tier_at_once(
    remote_here: GrpcService,
    inference_server: GrpcService,
    ledger_server: GrpcService,
    tmp_path: Path,
) -> None:
    tier_a, tier_b = address(remote_here), address(inference_server)
    routing = RoutingConfig(
        routes=[
            RouteConfig(
                model="big",
                chain=[
                    RouteStep(tier="local", upstream=tier_a, model="big"),
                    # The stand-in for Tier B: another inference-local serving it.
                    RouteStep(tier="gpu", upstream=tier_b, model=DEFAULT_MODEL),
                ],
            )
        ],
        retry_attempts=3,
        breaker_failures=1,
        breaker_reset_s=600,
    )
    settings = routed_settings(tmp_path, ledger_server, routing, tier_a)
    async with doorman_for(settings) as (stub, doorman):
        for _ in range(3):
            responses = [r async for r in stub.Chat(chat("big"))]
            assert (responses[-1].end.tier, responses[-1].end.upstream) == (
                types_pb2.TIER_GPU,
                tier_b,
            )
        # Tier A's breaker stayed closed: its own model is still served there.
        local = [r async for r in stub.Chat(chat(DEFAULT_MODEL))]
        assert local[-1].end.upstream == tier_a
        entries = await ledger_entries(ledger_server, doorman)
        errors = doorman.registry.get_sample_value(
            "slm_doorman_upstream_errors_total", {"tier": "TIER_LOCAL", "code": "UNAVAILABLE"}
        )
    # One attempt per request at Tier A (no retries with backoff), then Tier B.
    assert errors == 3
    assert [e.policy_decisions for e in entries[:3]] == [
        [f"fallback:TIER_LOCAL:{tier_a}:UNAVAILABLE", f"try:TIER_GPU:{tier_b}"]
    ] * 3
    assert all(e.status_code == 0 for e in entries)


async def test_a_remote_model_with_no_route_elsewhere_is_not_found(
    remote_here: GrpcService, ledger_server: GrpcService, tmp_path: Path
) -> None:
    """Only Tier A, which keeps "big" remote: not an outage to retry later (503) but a model
    this mesh does not serve, named as such."""
    settings = routed_settings(tmp_path, ledger_server, RoutingConfig(), address(remote_here))
    async with doorman_for(settings) as (stub, _):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            [r async for r in stub.Chat(chat("big"))]
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    error = from_rpc_error(caught.value)
    assert error.reason == "MODEL_NOT_SERVED"
    assert "no other tier of its route serves it" in error.message
