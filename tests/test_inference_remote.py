"""inference-remote against real OpenAI-compatible servers on loopback: llama.cpp's server and a
second service-slm mesh's gateway. Failover before the first token, clean errors after it."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import httpx
import pytest
from conftest import port0
from helpers import DEFAULT_MODEL, LlamaServer, Mesh, free_port, metric_value, wait_for
from prometheus_client import CollectorRegistry, generate_latest

from inference_remote.app import InferenceRemoteApp
from inference_remote.config import InferenceRemoteConfig, RemoteModelConfig, UpstreamConfig
from inference_remote.core import Request, Sampling
from inference_remote.pool import Upstream
from slm.config import DiscoveryConfig, TelemetryConfig
from slm.discovery import Connector
from slm.errors import from_rpc_error
from slm.server import GrpcService
from slm.v1 import inference_pb2, inference_pb2_grpc, types_pb2

AFFINITY_CHARS = 48


@pytest.fixture(scope="module")
def llama_servers(
    model_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[list[LlamaServer]]:
    logs = tmp_path_factory.mktemp("llama-servers")
    servers = [LlamaServer(model_path, logs / f"{i}.log") for i in range(2)]
    yield servers
    for server in servers:
        server.kill()


def remote_config(upstreams: list[UpstreamConfig], **kw: object) -> InferenceRemoteConfig:
    return InferenceRemoteConfig(
        models=[RemoteModelConfig(name=DEFAULT_MODEL, upstreams=upstreams)],
        prefix_affinity_chars=AFFINITY_CHARS,
        # Strict affinity, so a test knows where a prompt goes.
        affinity_slack=1000,
        health_interval_s=3600,
        adapter_registry="",
        **kw,
    )


@dataclass
class Remote:
    app: InferenceRemoteApp
    port: int
    stub: inference_pb2_grpc.InferenceServiceStub
    metrics: CollectorRegistry

    def upstream(self, name: str) -> Upstream:
        (model,) = self.app.core.models()
        return next(u for u in model.pool.upstreams if u.name == name)

    def prompt_for(self, name: str, tail: str) -> str:
        """A prompt whose prefix the pool's affinity sends to upstream `name`."""
        (model,) = self.app.core.models()
        for i in range(1000):
            prompt = f"Story {i:04d}. Once upon a time, in a quiet harbour town, {tail}"
            request = Request(model=DEFAULT_MODEL, sampling=Sampling(), prompt=prompt)
            key = self.app.core.affinity_key(request, "")
            chosen = model.pool.choose(key, set(), lambda u: True)
            if chosen is not None and chosen.name == name:
                return prompt
        raise AssertionError(f"no prompt maps to {name}")


@contextlib.asynccontextmanager
async def running(config: InferenceRemoteConfig) -> AsyncIterator[Remote]:
    metrics = CollectorRegistry()
    app = InferenceRemoteApp(config, Connector(DiscoveryConfig(), TelemetryConfig()), metrics)
    endpoint = port0(config.endpoint)
    async with (
        GrpcService("inference-remote", app, endpoint, TelemetryConfig(), metrics) as service,
        grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as channel,
    ):
        yield Remote(app, service.port, inference_pb2_grpc.InferenceServiceStub(channel), metrics)


@dataclass
class Outcome:
    deltas: list[str] = field(default_factory=list)
    end: types_pb2.StreamEnd | None = None
    error: grpc.aio.AioRpcError | None = None
    first: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def text(self) -> str:
        return "".join(self.deltas)


async def collect(
    stub: inference_pb2_grpc.InferenceServiceStub,
    prompt: str,
    outcome: Outcome | None = None,
    **sampling: object,
) -> Outcome:
    outcome = outcome or Outcome()
    request = inference_pb2.GenerateRequest(
        model=DEFAULT_MODEL,
        prompt=prompt,
        sampling=types_pb2.SamplingParams(**sampling),  # type: ignore[arg-type]
    )
    try:
        async for event in stub.Generate(request):
            if event.HasField("delta"):
                outcome.deltas.append(event.delta.text)
                outcome.first.set()
            else:
                assert outcome.end is None, "exactly one StreamEnd"
                outcome.end = event.end
    except grpc.aio.AioRpcError as error:
        outcome.error = error
    return outcome


def upstreams(servers: list[LlamaServer]) -> list[UpstreamConfig]:
    return [
        UpstreamConfig(name=name, url=server.url, kind="openai")
        for name, server in zip("ab", servers, strict=True)
    ]


async def test_streams_tokens_and_usage(llama_servers: list[LlamaServer]) -> None:
    async with running(remote_config(upstreams(llama_servers))) as remote:
        listed = await remote.stub.ListModels(inference_pb2.ListModelsRequest())
        assert [(m.name, m.loaded, m.owned_by) for m in listed.models] == [
            (DEFAULT_MODEL, True, "inference-remote")
        ]
        outcome = await collect(
            remote.stub, "The capital of France is", max_tokens=8, temperature=0.0
        )
        assert outcome.error is None
        assert outcome.end is not None
        assert outcome.text.strip()
        assert outcome.end.tier == types_pb2.TIER_GPU
        assert outcome.end.upstream in ("a", "b")
        assert outcome.end.finish_reason in (
            types_pb2.FINISH_REASON_LENGTH,
            types_pb2.FINISH_REASON_STOP,
        )
        # llama.cpp's server reports no usage in streams: one chunk is one token.
        assert 1 <= outcome.end.usage.completion_tokens <= 8
        assert outcome.end.usage.completion_tokens == len(outcome.deltas)


async def test_prefix_affinity_keeps_an_upstream(llama_servers: list[LlamaServer]) -> None:
    async with running(remote_config(upstreams(llama_servers))) as remote:
        for name in ("a", "b"):
            for tail in ("the", "a fisherman"):
                outcome = await collect(remote.stub, remote.prompt_for(name, tail), max_tokens=2)
                assert outcome.end is not None, outcome.error
                assert outcome.end.upstream == name


async def test_no_healthy_upstream_is_unavailable_but_serving() -> None:
    dead = UpstreamConfig(name="dead", url=f"http://127.0.0.1:{free_port()}/v1", kind="vllm")
    async with running(remote_config([dead])) as remote:
        outcome = await collect(remote.stub, "Hello", max_tokens=2)
        assert outcome.error is not None
        assert outcome.error.code() == grpc.StatusCode.UNAVAILABLE
        listed = await remote.stub.ListModels(inference_pb2.ListModelsRequest())
        assert not listed.models[0].loaded


async def test_unknown_model_and_bad_sampling(llama_servers: list[LlamaServer]) -> None:
    async with running(remote_config(upstreams(llama_servers))) as remote:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in remote.stub.Generate(
                inference_pb2.GenerateRequest(model="nope", prompt="x")
            ):
                pass
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        outcome = await collect(remote.stub, "x", temperature=5.0)
        assert outcome.error is not None
        assert outcome.error.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_external_upstream_sends_its_key(model_path: Path, tmp_path: Path) -> None:
    """Tier C: the key comes from a secret file; the host must be on the allowlist."""
    key_file = tmp_path / "key"
    key_file.write_text("sk-test-123\n")
    server = LlamaServer(model_path, tmp_path / "keyed.log", api_key="sk-test-123")
    try:
        good = UpstreamConfig(name="ext", url=server.url, kind="external", api_key_file=key_file)
        config = remote_config([good], external_allowlist=["127.0.0.1"])
        async with running(config) as remote:
            outcome = await collect(remote.stub, "Hello", max_tokens=2)
            assert outcome.end is not None, outcome.error
            assert outcome.end.tier == types_pb2.TIER_EXTERNAL
        wrong = tmp_path / "wrong"
        wrong.write_text("sk-wrong")
        bad = UpstreamConfig(name="ext", url=server.url, kind="external", api_key_file=wrong)
        async with running(remote_config([bad], external_allowlist=["127.0.0.1"])) as remote:
            # The health probe is refused too (401), so the upstream never counts as healthy.
            outcome = await collect(remote.stub, "Hello", max_tokens=2)
            assert outcome.error is not None
            assert outcome.error.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        server.kill()


def test_external_upstreams_need_allowlist_and_key(tmp_path: Path) -> None:
    ext = UpstreamConfig(
        name="x", url="https://api.example.com/v1", kind="external", api_key_env="K"
    )
    with pytest.raises(ValueError, match="allowlist"):
        remote_config([ext])
    keyless = UpstreamConfig(name="x", url="https://api.example.com/v1", kind="external")
    with pytest.raises(ValueError, match="api_key"):
        remote_config([keyless], external_allowlist=["api.example.com"])
    assert remote_config([ext], external_allowlist=["api.example.com"]).models


async def test_mesh_gateway_as_upstream_usage_and_cancel(mesh: Mesh) -> None:
    """A second service-slm (its gateway through Envoy) as the upstream: chat, usage, cancel."""
    gateway = UpstreamConfig(name="mesh", url=f"{mesh.base_url}/v1", kind="openai")
    async with running(remote_config([gateway])) as remote:
        chat = inference_pb2.GenerateRequest(
            model=DEFAULT_MODEL,
            chat=types_pb2.ChatInput(
                messages=[types_pb2.ChatMessage(role=types_pb2.ROLE_USER, content="Name a colour.")]
            ),
            sampling=types_pb2.SamplingParams(max_tokens=8, temperature=0.0),
        )
        events = [e async for e in remote.stub.Generate(chat)]
        end = events[-1].end
        # The gateway sends usage in its last chunk, and it is passed back as it is.
        assert end.usage.prompt_tokens > 0
        assert 1 <= end.usage.completion_tokens <= 8
        assert end.upstream == "mesh"

        before = engine_cancelled(mesh)
        call = remote.stub.Generate(
            inference_pb2.GenerateRequest(
                model=DEFAULT_MODEL,
                prompt="Count from one to one thousand: one, two,",
                sampling=types_pb2.SamplingParams(max_tokens=1500, temperature=1.0, seed=5),
            )
        )
        received = 0
        async for event in call:
            received += event.HasField("delta")
            if received == 3:
                break
        call.cancel()
        # The mesh's engine batches sequences, so a later request proves nothing about this
        # one: its own count of cancelled sequences moves when the sequence leaves the batch.
        assert await asyncio.to_thread(wait_for, lambda: engine_cancelled(mesh) == before + 1)
        after = await collect(remote.stub, "Hi", max_tokens=2)
        assert after.end is not None, after.error


def engine_cancelled(mesh: Mesh) -> float:
    text = httpx.get(mesh.inference_metrics_url).text
    return metric_value(
        text, "slm_engine_requests_total", model=DEFAULT_MODEL, finish_reason="cancelled"
    )


async def test_kill_an_upstream_under_load(llama_servers: list[LlamaServer]) -> None:
    """Runs last in this module: it kills upstream "a"."""
    server_a = llama_servers[0]
    async with running(remote_config(upstreams(llama_servers))) as remote:
        on_a = Outcome()
        streaming_a = asyncio.create_task(
            collect(
                remote.stub, remote.prompt_for("a", "long"), on_a,
                max_tokens=400, temperature=1.0, seed=1,
            )
        )  # fmt: skip
        streaming_b = asyncio.create_task(
            collect(
                remote.stub, remote.prompt_for("b", "long"), max_tokens=40, temperature=1.0, seed=2
            )
        )
        await asyncio.wait_for(on_a.first.wait(), timeout=120)
        # These queue at "a" behind the running stream (llama.cpp's server runs one at a time),
        # so they have no first token yet when "a" dies.
        queued = [
            asyncio.create_task(collect(remote.stub, remote.prompt_for("a", f"q{i}"), max_tokens=4))
            for i in range(3)
        ]
        (model,) = remote.app.core.models()
        async with asyncio.timeout(60):
            await model.pool.wait_until(lambda: remote.upstream("a").outstanding == 4)
        server_a.kill()
        broken = await streaming_a
        # After its first token, the stream ends with a clean error, not a silent switch.
        assert broken.deltas
        assert broken.error is not None
        assert broken.error.code() == grpc.StatusCode.UNAVAILABLE
        assert from_rpc_error(broken.error).reason == "UPSTREAM_BROKEN"
        assert broken.end is None
        # Before their first token, they fail over to "b" and finish normally.
        for outcome in await asyncio.gather(*queued):
            assert outcome.error is None, outcome.error
            assert outcome.end is not None
            assert outcome.end.upstream == "b"
        other = await streaming_b
        assert other.end is not None
        assert other.end.upstream == "b"
        # "a" is now known down: new requests with its prefix go straight to "b".
        after = await collect(remote.stub, remote.prompt_for("b", "x"), max_tokens=2)
        assert after.end is not None
        assert not remote.upstream("a").healthy
        errors = metric_value(
            generate_latest(remote.metrics).decode(),
            "slm_remote_upstream_errors_total",
            upstream="a",
        )
        assert errors >= 4
