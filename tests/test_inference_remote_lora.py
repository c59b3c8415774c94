"""vLLM runtime LoRA through inference-remote, against FakeVllmLoraEndpoint (vLLM needs a GPU).

The fake follows vLLM's documented behaviour for VLLM_ALLOW_RUNTIME_LORA_UPDATING servers:
POST /v1/load_lora_adapter {"lora_name", "lora_path"} answers 200 with a plain-text success
line, 400 "The lora adapter '<name>' has already been loaded." for a name it has, and 400 when
the path holds no adapter; POST /v1/unload_lora_adapter; a loaded adapter is then served as a
model of its own name (and listed by /v1/models with its parent), an unknown model is a 404.
The adapter registry is the real one, over gRPC.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from conftest import port0
from fastapi import FastAPI, Request
from helpers import DEFAULT_MODEL, mesh_settings, runtime
from prometheus_client import CollectorRegistry
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from adapters.app import build_app as build_registry_app
from inference_remote.app import RegistryAdapters
from inference_remote.core import (
    Delta,
    End,
    ModelPool,
    RemoteInference,
    RemoteMetrics,
    Sampling,
)
from inference_remote.core import (
    Request as RemoteRequest,
)
from inference_remote.pool import Pool, Upstream
from inference_remote.upstream import Timeouts, UpstreamClient
from slm.config import DiscoveryConfig, TelemetryConfig
from slm.discovery import Connector
from slm.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from slm.server import GrpcService
from slm.v1 import adapters_pb2, adapters_pb2_grpc


def _error(status: int, message: str, kind: str) -> JSONResponse:
    return JSONResponse(
        {"object": "error", "message": message, "type": kind, "param": None, "code": status},
        status_code=status,
    )


@dataclass
class FakeVllmLoraEndpoint:
    """A fake of a vLLM OpenAI server's runtime-LoRA API; it generates no real text."""

    base_model: str
    loaded: dict[str, str] = field(default_factory=dict)
    load_calls: list[dict[str, str]] = field(default_factory=list)
    served_models: list[str] = field(default_factory=list)

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.get("/v1/models")
        async def models() -> dict[str, Any]:
            data = [{"id": self.base_model, "object": "model", "parent": None}]
            data += [
                {"id": n, "object": "model", "root": p, "parent": self.base_model}
                for n, p in self.loaded.items()
            ]
            return {"object": "list", "data": data}

        @app.post("/v1/load_lora_adapter")
        async def load(request: Request) -> Response:
            body = await request.json()
            self.load_calls.append(body)
            name, path = body.get("lora_name"), body.get("lora_path")
            if not name or not path:
                return _error(
                    400, "Both 'lora_name' and 'lora_path' must be provided.", "BadRequestError"
                )
            if name in self.loaded:
                return _error(
                    400, f"The lora adapter '{name}' has already been loaded.", "BadRequestError"
                )
            if not (Path(path) / "adapter_config.json").is_file():
                return _error(
                    400,
                    f"Loading lora {name} failed: No adapter found for {path}",
                    "BadRequestError",
                )
            self.loaded[name] = path
            return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

        @app.post("/v1/unload_lora_adapter")
        async def unload(request: Request) -> Response:
            name = (await request.json()).get("lora_name")
            if name not in self.loaded:
                return _error(404, f"The lora adapter '{name}' cannot be found.", "NotFoundError")
            del self.loaded[name]
            return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")

        @app.post("/v1/completions")
        async def completions(request: Request) -> Response:
            body = await request.json()
            model = body["model"]
            if model != self.base_model and model not in self.loaded:
                return _error(404, f"The model `{model}` does not exist.", "NotFoundError")
            self.served_models.append(model)

            def events() -> Any:
                for piece in ("served", " by ", model):
                    chunk = {"choices": [{"index": 0, "text": piece, "finish_reason": None}]}
                    yield f"data: {json.dumps(chunk)}\n\n"
                end = {"choices": [{"index": 0, "text": "", "finish_reason": "stop"}]}
                yield f"data: {json.dumps(end)}\n\n"
                usage = {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 3}}
                yield f"data: {json.dumps(usage)}\n\n"
                yield "data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream")

        return app


@pytest.fixture
async def registry_address(tmp_path: Path) -> AsyncIterator[str]:
    settings = mesh_settings(tmp_path)
    metrics = CollectorRegistry()
    app = build_registry_app(settings.adapters, runtime(settings, metrics))
    async with GrpcService(
        "adapter-registry", app, port0(settings.adapters.endpoint), settings.telemetry, metrics
    ) as service:
        yield f"127.0.0.1:{service.port}"


async def register(
    address: str,
    name: str,
    source: str,
    fmt: adapters_pb2.AdapterFormat.ValueType,
    base: str = DEFAULT_MODEL,
) -> adapters_pb2.Adapter:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = adapters_pb2_grpc.AdapterRegistryServiceStub(channel)
        reply = await stub.RegisterAdapter(
            adapters_pb2.RegisterAdapterRequest(
                name=name, base_model=base, format=fmt, source=source
            )
        )
        adapter: adapters_pb2.Adapter = reply.adapter
        return adapter


def peft_dir(root: Path) -> Path:
    root.mkdir()
    (root / "adapter_config.json").write_text(
        '{"r": 8, "lora_alpha": 16, "target_modules": ["q_proj"]}'
    )
    (root / "adapter_model.safetensors").write_bytes(bytes(range(256)) * 16)
    return root


@dataclass
class Setup:
    core: RemoteInference
    fakes: list[FakeVllmLoraEndpoint]
    upstreams: list[Upstream]
    pool: Pool


@pytest.fixture
async def setup(registry_address: str) -> AsyncIterator[Setup]:
    fakes = [FakeVllmLoraEndpoint(DEFAULT_MODEL) for _ in range(2)]
    timeouts = Timeouts(5, 30, 30)
    upstreams = [
        Upstream(
            name=f"vllm-{i}",
            kind="vllm",
            model=DEFAULT_MODEL,
            max_concurrency=4,
            client=UpstreamClient(
                f"http://vllm-{i}/v1", timeouts, transport=httpx.ASGITransport(app=fake.app())
            ),
        )
        for i, fake in enumerate(fakes)
    ]
    pool = Pool(DEFAULT_MODEL, upstreams, affinity_slack=1000)
    await pool.probe_all()
    connector = Connector(DiscoveryConfig(), TelemetryConfig())
    source = RegistryAdapters(connector, registry_address)
    core = RemoteInference(
        [ModelPool(DEFAULT_MODEL, pool, 0)],
        RemoteMetrics(CollectorRegistry()),
        external_allowlist=[],
        max_attempts=2,
        queue_timeout_s=1,
        prefix_affinity_chars=64,
        adapters=source,
    )
    yield Setup(core, fakes, upstreams, pool)
    await connector.close()
    for upstream in upstreams:
        await upstream.client.aclose()


async def generate(core: RemoteInference, **kw: Any) -> tuple[str, End]:
    request = RemoteRequest(
        model=kw.pop("model", DEFAULT_MODEL), sampling=Sampling(max_tokens=8), prompt="Hi", **kw
    )
    text, end = "", None
    async for event in core.generate(request):
        if isinstance(event, Delta):
            text += event.text
        else:
            end = event
    assert end is not None
    return text, end


async def test_adapter_loads_on_first_use_only(
    setup: Setup, registry_address: str, tmp_path: Path
) -> None:
    adapter = await register(
        registry_address,
        "style",
        str(peft_dir(tmp_path / "style")),
        adapters_pb2.ADAPTER_FORMAT_PEFT,
    )
    text, end = await generate(setup.core, adapter="style")
    assert text == "served by style"
    assert end.prompt_tokens == 5
    assert end.completion_tokens == 3
    served = next(f for f in setup.fakes if f.load_calls)
    # The path is the registry's verified copy, not the source the admin gave.
    assert served.load_calls == [{"lora_name": "style", "lora_path": adapter.path}]
    # Same adapter again, also as "model:adapter": no second load.
    text, _ = await generate(setup.core, model=f"{DEFAULT_MODEL}:style")
    assert text == "served by style"
    assert sum(len(f.load_calls) for f in setup.fakes) == 1
    # The base model is still served without the adapter.
    text, _ = await generate(setup.core)
    assert text == f"served by {DEFAULT_MODEL}"


async def test_each_upstream_loads_on_its_own_first_use(
    setup: Setup, registry_address: str, tmp_path: Path
) -> None:
    await register(
        registry_address,
        "style",
        str(peft_dir(tmp_path / "style")),
        adapters_pb2.ADAPTER_FORMAT_PEFT,
    )
    _, first = await generate(setup.core, adapter="style")
    used = next(u for u in setup.upstreams if u.name == first.upstream)
    await setup.pool.mark(used, False)
    _, second = await generate(setup.core, adapter="style")
    assert second.upstream != first.upstream
    assert [len(f.load_calls) for f in setup.fakes] == [1, 1]
    # The first upstream comes back (maybe restarted): it is asked again; vLLM's "already
    # been loaded" answer counts as loaded.
    await setup.pool.mark(used, True)
    await setup.pool.mark(next(u for u in setup.upstreams if u is not used), False)
    text, third = await generate(setup.core, adapter="style")
    assert third.upstream == first.upstream
    assert text == "served by style"


async def test_adapter_mount_rewrites_the_path(
    setup: Setup, registry_address: str, tmp_path: Path
) -> None:
    adapter = await register(
        registry_address,
        "style",
        str(peft_dir(tmp_path / "style")),
        adapters_pb2.ADAPTER_FORMAT_PEFT,
    )
    for upstream in setup.upstreams:
        upstream.adapter_mount = "/mnt/adapters"
    with pytest.raises(Unavailable, match="could serve"):
        await generate(setup.core, adapter="style")
    # The fake looks for the adapter at the mounted path, which does not exist on this host.
    calls = [c for f in setup.fakes for c in f.load_calls]
    assert {c["lora_path"] for c in calls} == {f"/mnt/adapters/{adapter.store_path}"}


async def test_adapter_errors(
    setup: Setup, registry_address: str, tmp_path: Path, model_path: Path
) -> None:
    from lora_fixture import make_lora_gguf

    gguf = make_lora_gguf(model_path, tmp_path / "l.gguf", rank=2)
    await register(registry_address, "local-only", str(gguf), adapters_pb2.ADAPTER_FORMAT_GGUF)
    await register(
        registry_address,
        "other",
        str(peft_dir(tmp_path / "o")),
        adapters_pb2.ADAPTER_FORMAT_PEFT,
        base="other-model",
    )
    with pytest.raises(FailedPrecondition, match="GGUF"):
        await generate(setup.core, adapter="local-only")
    with pytest.raises(InvalidArgument, match="other-model"):
        await generate(setup.core, adapter="other")
    with pytest.raises(NotFound):
        await generate(setup.core, adapter="missing")
    with pytest.raises(InvalidArgument) as caught:
        await generate(setup.core, adapter="other", adapter_scale=0.5)
    assert caught.value.field == "adapter_scale"
    assert all(not f.load_calls for f in setup.fakes)
