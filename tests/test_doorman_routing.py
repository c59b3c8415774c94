"""Tier routing: fallback before the first token only, circuit breakers, manifest routing.

Every upstream is a real inference-local gRPC server on port 0, or a loopback port where
nothing listens (a dead upstream).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from helpers import DEFAULT_MODEL, free_port, mesh_settings, runtime
from prometheus_client import CollectorRegistry

from doorman.breaker import BreakerState, CircuitBreaker
from doorman.config import ManifestConfig, RouteConfig, RouteStep, RoutingConfig
from mesh.settings import Settings
from slm.server import GrpcService
from slm.v1 import (
    doorman_pb2,
    doorman_pb2_grpc,
    inference_pb2,
    inference_pb2_grpc,
    ledger_pb2,
    ledger_pb2_grpc,
    types_pb2,
)


def address(service: GrpcService) -> str:
    return f"127.0.0.1:{service.port}"


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def state(breaker: CircuitBreaker) -> BreakerState:
    return breaker.state


def test_breaker_opens_after_consecutive_failures_and_probes_once() -> None:
    clock = Clock()
    breaker = CircuitBreaker(failures=2, reset_s=5, clock=clock)
    assert breaker.allow()
    breaker.failure()
    assert state(breaker) is BreakerState.CLOSED
    breaker.failure()
    assert state(breaker) is BreakerState.OPEN
    assert not breaker.allow()
    assert breaker.retry_after_s() == 5
    clock.now += 5
    # Half-open: exactly one probe goes out; the others are refused while it runs.
    assert breaker.allow()
    assert state(breaker) is BreakerState.HALF_OPEN
    assert not breaker.allow()
    breaker.failure()
    assert state(breaker) is BreakerState.OPEN
    clock.now += 5
    assert breaker.allow()
    breaker.success()
    assert state(breaker) is BreakerState.CLOSED
    assert breaker.allow()
    assert breaker.allow()


def test_breaker_lets_another_probe_go_when_one_is_abandoned() -> None:
    clock = Clock()
    breaker = CircuitBreaker(failures=1, reset_s=1, clock=clock)
    breaker.failure()
    clock.now += 1
    assert breaker.allow()
    breaker.abandon()
    assert breaker.allow()


@contextlib.asynccontextmanager
async def doorman_for(
    settings: Settings,
) -> AsyncIterator[tuple[doorman_pb2_grpc.DoormanServiceStub, GrpcService]]:
    from doorman.app import build_app

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
        grpc.aio.insecure_channel(address(service)) as channel,
    ):
        yield doorman_pb2_grpc.DoormanServiceStub(channel), service


def routed_settings(
    tmp_path: Path, ledger: GrpcService, routing: RoutingConfig, inference: str
) -> Settings:
    settings = mesh_settings(tmp_path)
    settings.doorman = settings.doorman.model_copy(
        update={"ledger": address(ledger), "inference_local": inference, "routing": routing}
    )
    return settings


def chat(model: str, text: str = "Say hello.", max_tokens: int = 4) -> doorman_pb2.ChatRequest:
    return doorman_pb2.ChatRequest(
        model=model,
        messages=[types_pb2.ChatMessage(role=types_pb2.ROLE_USER, content=text)],
        sampling=types_pb2.SamplingParams(max_tokens=max_tokens, temperature=0),
    )


async def ledger_entries(ledger: GrpcService, service: GrpcService) -> list[ledger_pb2.LedgerEntry]:
    await service.app.doorman.drain()  # type: ignore[attr-defined]
    async with grpc.aio.insecure_channel(address(ledger)) as channel:
        records = await ledger_pb2_grpc.LedgerServiceStub(channel).List(ledger_pb2.ListRequest())
    return [record.entry for record in records.records]


async def test_dead_upstream_falls_back_before_the_first_token_and_opens_its_breaker(
    inference_server: GrpcService, ledger_server: GrpcService, tmp_path: Path
) -> None:
    dead = f"127.0.0.1:{free_port()}"
    live = address(inference_server)
    routing = RoutingConfig(
        routes=[
            RouteConfig(
                model="chained",
                chain=[
                    RouteStep(tier="gpu", upstream=dead, model=DEFAULT_MODEL),
                    RouteStep(tier="local", upstream=live, model=DEFAULT_MODEL),
                ],
            )
        ],
        retry_attempts=2,
        retry_initial_backoff_s=0.01,
        breaker_failures=2,
        breaker_reset_s=600,
    )
    async with doorman_for(routed_settings(tmp_path, ledger_server, routing, live)) as (
        stub,
        service,
    ):
        first = [r async for r in stub.Chat(chat("chained"))]
        second = [r async for r in stub.Chat(chat("chained"))]
        for responses in (first, second):
            end = responses[-1].end
            assert (end.tier, end.upstream) == (types_pb2.TIER_LOCAL, live)
            assert end.model == DEFAULT_MODEL
        entries = await ledger_entries(ledger_server, service)
    assert [e.status_code for e in entries] == [0, 0]
    # Two attempts on the dead upstream (the retry), then the fallback; the breaker is open then.
    assert entries[0].policy_decisions == [
        f"fallback:TIER_GPU:{dead}:UNAVAILABLE",
        f"try:TIER_LOCAL:{live}",
    ]
    assert entries[1].policy_decisions == [
        f"breaker_open:TIER_GPU:{dead}",
        f"try:TIER_LOCAL:{live}",
    ]
    assert entries[0].upstream == live


async def test_no_upstream_left_is_unavailable_with_retry_info(
    ledger_server: GrpcService, tmp_path: Path
) -> None:
    dead = f"127.0.0.1:{free_port()}"
    routing = RoutingConfig(retry_attempts=1)
    async with doorman_for(routed_settings(tmp_path, ledger_server, routing, dead)) as (stub, _):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            [r async for r in stub.Chat(chat(DEFAULT_MODEL))]
    from slm.errors import from_rpc_error

    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    error = from_rpc_error(caught.value)
    assert error.reason == "NO_UPSTREAM"
    assert error.retry_after_s is not None
    assert error.retry_after_s >= 1


def own_engine(settings: Settings, name: str) -> GrpcService:
    """A real inference-local of the test's own, which it may stop at once (no grace)."""
    from inference_local.app import build_app

    registry = CollectorRegistry()
    endpoint = settings.inference_local.endpoint.model_copy(update={"port": 0, "metrics_port": 0})
    return GrpcService(
        name,
        build_app(settings.inference_local, runtime(settings, registry)),
        endpoint,
        settings.telemetry,
        registry,
        serve_metrics=False,
        grace_s=0,
    )


@pytest.fixture
async def second_engine(
    model_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[GrpcService]:
    """Another real inference-local, which the test may stop at once."""
    settings = mesh_settings(tmp_path_factory.mktemp("second"))
    async with own_engine(settings, "inference-local-2") as service:
        yield service


async def test_an_upstream_dying_after_the_first_token_is_never_retried_elsewhere(
    inference_server: GrpcService,
    second_engine: GrpcService,
    ledger_server: GrpcService,
    tmp_path: Path,
) -> None:
    doomed = address(second_engine)
    live = address(inference_server)
    routing = RoutingConfig(
        routes=[
            RouteConfig(
                model="chained",
                chain=[
                    RouteStep(tier="local", upstream=doomed, model=DEFAULT_MODEL),
                    RouteStep(tier="gpu", upstream=live, model=DEFAULT_MODEL),
                ],
            )
        ]
    )
    async with doorman_for(routed_settings(tmp_path, ledger_server, routing, live)) as (
        stub,
        service,
    ):
        call = stub.Chat(chat("chained", "Count from one to two hundred.", max_tokens=400))
        deltas = 0
        stopping: asyncio.Task[None] | None = None

        async def read_all() -> None:
            nonlocal deltas, stopping
            async for response in call:
                assert response.HasField("delta"), "the stream must not end normally"
                deltas += 1
                if stopping is None:
                    # The client has its first token: now the serving upstream goes away.
                    stopping = asyncio.create_task(second_engine.__aexit__(None, None, None))

        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await read_all()
        assert stopping is not None
        await stopping
        assert deltas >= 1
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        entries = await ledger_entries(ledger_server, service)
    assert len(entries) == 1
    assert entries[0].upstream == doomed
    assert entries[0].policy_decisions == []
    assert entries[0].status_code == grpc.StatusCode.UNAVAILABLE.value[0]


async def test_manifest_routes_through_router_then_specialist(
    inference_server: GrpcService, ledger_server: GrpcService, tmp_path: Path
) -> None:
    live = address(inference_server)
    intents = {"math": DEFAULT_MODEL, "poetry": DEFAULT_MODEL}
    routing = RoutingConfig(
        manifests=[
            ManifestConfig(
                alias="auto", router_model=DEFAULT_MODEL, intents=intents, fallback=DEFAULT_MODEL
            )
        ]
    )
    async with doorman_for(routed_settings(tmp_path, ledger_server, routing, live)) as (
        stub,
        service,
    ):
        responses = [r async for r in stub.Chat(chat("auto", "What is 12 times 7?"))]
        entries = await ledger_entries(ledger_server, service)
    end = responses[-1].end
    router_hop, specialist_hop = end.hops
    # The router's answer is constrained to the manifest's intents.
    assert router_hop.intent in intents
    assert (router_hop.model, router_hop.upstream) == (DEFAULT_MODEL, live)
    assert specialist_hop.model == intents[router_hop.intent]
    assert specialist_hop.intent == ""
    assert list(entries[0].hops) == list(end.hops)
    assert entries[0].model == "auto"


def test_external_upstreams_must_be_on_the_allowlist() -> None:
    route = RouteConfig(
        model="big", chain=[RouteStep(tier="external", upstream="remote.example:50053")]
    )
    with pytest.raises(ValueError, match=r"not on doorman\.routing\.external_allowlist"):
        RoutingConfig(routes=[route])
    assert RoutingConfig(routes=[route], external_allowlist=["remote.example"]).routes


def test_a_model_or_alias_given_twice_is_refused() -> None:
    route = RouteConfig(model="big", chain=[RouteStep(tier="local", upstream="a:1")])
    with pytest.raises(ValueError, match="route for model 'big' is given twice"):
        RoutingConfig(routes=[route, route])
    manifest = ManifestConfig(alias="auto", router_model="r", intents={"x": "s"}, fallback="s")
    with pytest.raises(ValueError, match="manifest alias 'auto' is given twice"):
        RoutingConfig(manifests=[manifest, manifest])


# Longer than any first token of the live upstream takes on a loaded 2-core machine: only an
# upstream that cannot answer reaches it.
FIRST_TOKEN_TIMEOUT_S = 10.0


@pytest.fixture
async def one_slot_engine(
    model_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[GrpcService]:
    """A real inference-local with one sequence slot, so one generation makes it busy."""
    settings = mesh_settings(tmp_path_factory.mktemp("one-slot"))
    local = settings.inference_local
    settings.inference_local = local.model_copy(
        update={"models": [local.models[0].model_copy(update={"parallel": 1})]}
    )
    async with own_engine(settings, "inference-local-busy") as service:
        yield service


def two_step_chain(first: str, second: str, **policy: float) -> RoutingConfig:
    return RoutingConfig(
        routes=[
            RouteConfig(
                model="chained",
                chain=[
                    RouteStep(tier="gpu", upstream=first, model=DEFAULT_MODEL),
                    RouteStep(tier="local", upstream=second, model=DEFAULT_MODEL),
                ],
            )
        ],
        breaker_failures=1,
        breaker_reset_s=600,
        **policy,
    )


async def test_a_busy_upstream_goes_to_the_next_tier_without_opening_its_breaker(
    one_slot_engine: GrpcService,
    inference_server: GrpcService,
    ledger_server: GrpcService,
    tmp_path: Path,
) -> None:
    busy, live = address(one_slot_engine), address(inference_server)
    # The timeout is the live upstream's too: long enough for its first token on a loaded
    # machine; the busy one never gives one while its slot is held, however long it is.
    routing = two_step_chain(
        busy, live, first_token_timeout_s=FIRST_TOKEN_TIMEOUT_S, retry_attempts=3
    )
    hold = inference_pb2.GenerateRequest(
        model=DEFAULT_MODEL,
        prompt="Tell me a very long story.",
        sampling=types_pb2.SamplingParams(max_tokens=4000, logit_bias={1: -100, 106: -100}),
    )
    async with (
        grpc.aio.insecure_channel(busy) as channel,
        doorman_for(routed_settings(tmp_path, ledger_server, routing, live)) as (stub, service),
    ):
        # The busy upstream's one slot runs a generation that lasts until the test cancels it,
        # so a request there waits in its queue past the first-token timeout.
        holding = inference_pb2_grpc.InferenceServiceStub(channel).Generate(hold)
        await holding.read()
        try:
            for _ in range(2):
                responses = [r async for r in stub.Chat(chat("chained"))]
                assert responses[-1].end.upstream == live
        finally:
            holding.cancel()
        entries = await ledger_entries(ledger_server, service)
    # One attempt each (a busy upstream is not retried), and never `breaker_open`: with
    # breaker_failures=1, a timeout counted as a failure would have opened it for the second.
    for entry in entries:
        assert list(entry.policy_decisions) == [
            f"fallback:TIER_GPU:{busy}:DEADLINE_EXCEEDED",
            f"try:TIER_LOCAL:{live}",
        ]


async def test_an_upstream_that_never_answers_opens_its_breaker(
    inference_server: GrpcService, ledger_server: GrpcService, tmp_path: Path
) -> None:
    accepted: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)  # takes the connection, never says a word

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    hung = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
    live = address(inference_server)
    routing = two_step_chain(
        hung, live, first_token_timeout_s=FIRST_TOKEN_TIMEOUT_S, retry_attempts=1
    )
    try:
        async with doorman_for(routed_settings(tmp_path, ledger_server, routing, live)) as (
            stub,
            service,
        ):
            for _ in range(2):
                responses = [r async for r in stub.Chat(chat("chained"))]
                assert responses[-1].end.upstream == live
            entries = await ledger_entries(ledger_server, service)
    finally:
        for writer in accepted:
            writer.close()
        server.close()
    assert [list(e.policy_decisions) for e in entries] == [
        [f"fallback:TIER_GPU:{hung}:DEADLINE_EXCEEDED", f"try:TIER_LOCAL:{live}"],
        [f"breaker_open:TIER_GPU:{hung}", f"try:TIER_LOCAL:{live}"],
    ]
