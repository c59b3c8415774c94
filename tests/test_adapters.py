"""The adapter registry: core with a real SQLite file, gRPC on port 0, and the admin REST API."""

from __future__ import annotations

import functools
import hashlib
import http.server
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from conftest import port0
from helpers import gateway_settings, mesh_settings, runtime
from lora_fixture import make_lora_gguf
from prometheus_client import CollectorRegistry

from adapters.app import build_app, build_registry
from adapters.artefacts import Format, tree_sha256
from adapters.config import AdapterRegistryConfig
from adapters.registry import AdapterRegistry, Registration
from slm.config import ServiceEndpoint
from slm.errors import Internal, InvalidArgument, NotFound, SlmError
from slm.server import GrpcService
from slm.v1 import adapters_pb2, adapters_pb2_grpc, types_pb2


@pytest.fixture(scope="module")
def lora_file(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_lora_gguf(model_path, tmp_path_factory.mktemp("lora") / "lora.gguf", rank=4)


@pytest.fixture
def peft_dir(tmp_path: Path) -> Path:
    root = tmp_path / "peft-src"
    root.mkdir()
    (root / "adapter_config.json").write_text('{"r": 8, "lora_alpha": 16}')
    (root / "adapter_model.safetensors").write_bytes(bytes(range(256)) * 64)
    return root


def sha_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def same_bytes(a: Path, b: Path) -> bool:
    return a.read_bytes() == b.read_bytes()


def config(tmp_path: Path, **overrides: object) -> AdapterRegistryConfig:
    return AdapterRegistryConfig(
        endpoint=ServiceEndpoint(port=0, metrics_port=0),
        store_dir=tmp_path / "store",
        database=tmp_path / "adapters.sqlite3",
        **overrides,
    )


@pytest.fixture
async def registry(tmp_path: Path) -> AsyncIterator[AdapterRegistry]:
    reg = build_registry(config(tmp_path))
    await reg.open()
    yield reg
    await reg.close()


def gguf(
    name: str, source: Path | str, sha256: str = "", default_scale: float = 1.0
) -> Registration:
    return Registration(
        name=name,
        base_model="gemma-3-270m",
        format=Format.GGUF,
        source=str(source),
        sha256=sha256,
        default_scale=default_scale,
    )


async def test_register_copies_and_get_verifies(registry: AdapterRegistry, lora_file: Path) -> None:
    sha = sha_of(lora_file)
    adapter = await registry.register(gguf("tone", lora_file, sha256=sha, default_scale=0.5))
    assert adapter.record.sha256 == sha
    assert same_bytes(adapter.path, lora_file)
    assert adapter.path.parent.name == sha  # content-addressed
    got = await registry.get("tone")
    assert got.record == adapter.record
    assert got.record.default_scale == 0.5


async def test_tampered_artefact_fails_its_checksum(
    registry: AdapterRegistry, lora_file: Path
) -> None:
    adapter = await registry.register(gguf("tone", lora_file))
    with adapter.path.open("r+b") as f:
        f.seek(100)
        f.write(b"\xff\xff")
    with pytest.raises(Internal) as caught:
        await registry.get("tone")
    assert caught.value.reason == "ADAPTER_CHECKSUM_MISMATCH"
    adapter.path.unlink()
    with pytest.raises(Internal):
        await registry.get("tone")


async def test_wrong_sha256_is_refused_and_nothing_stored(
    registry: AdapterRegistry, lora_file: Path, tmp_path: Path
) -> None:
    with pytest.raises(InvalidArgument) as caught:
        await registry.register(gguf("tone", lora_file, sha256="0" * 64))
    assert caught.value.field == "sha256"
    assert [p.name for p in (tmp_path / "store").iterdir()] == []
    with pytest.raises(NotFound):
        await registry.get("tone")


@pytest.mark.parametrize(
    ("registration", "field"),
    [
        (Registration("Bad:Name", "m", Format.GGUF, "/x"), "name"),
        (Registration("ok", "", Format.GGUF, "/x"), "base_model"),
        (Registration("ok", "m", Format.GGUF, "/nonexistent/file.gguf"), "source"),
        (Registration("ok", "m", Format.GGUF, "/x", sha256="XYZ"), "sha256"),
        (Registration("ok", "m", Format.GGUF, "/x", default_scale=9.0), "default_scale"),
        (Registration("ok", "m", Format.GGUF, "/x", tiers=("moon",)), "tiers"),
        (Registration("ok", "m", Format.PEFT, "https://example.com/a"), "source"),
    ],
)
async def test_bad_registrations(
    registry: AdapterRegistry, registration: Registration, field: str
) -> None:
    with pytest.raises(InvalidArgument) as caught:
        await registry.register(registration)
    assert caught.value.field == field


async def test_not_a_gguf_file(registry: AdapterRegistry, tmp_path: Path) -> None:
    bogus = tmp_path / "x.gguf"
    bogus.write_bytes(b"not gguf at all")
    with pytest.raises(InvalidArgument, match="not a GGUF"):
        await registry.register(gguf("x", bogus))


async def test_source_dirs_confine_local_sources(tmp_path: Path, lora_file: Path) -> None:
    reg = build_registry(config(tmp_path, source_dirs=[tmp_path / "allowed"]))
    await reg.open()
    try:
        with pytest.raises(InvalidArgument, match="outside"):
            await reg.register(gguf("x", lora_file))
    finally:
        await reg.close()


async def test_duplicate_name_and_shared_artefact_lifecycle(
    registry: AdapterRegistry, lora_file: Path
) -> None:
    first = await registry.register(gguf("a", lora_file))
    with pytest.raises(SlmError) as caught:
        await registry.register(gguf("a", lora_file))
    assert caught.value.code == grpc.StatusCode.ALREADY_EXISTS
    second = await registry.register(gguf("b", lora_file))
    assert second.path == first.path  # one artefact, two names
    await registry.delete("a")
    assert second.path.exists()  # still named by "b"
    await registry.delete("b")
    assert not second.path.exists()
    with pytest.raises(NotFound):
        await registry.delete("b")


async def test_peft_directory(registry: AdapterRegistry, peft_dir: Path) -> None:
    adapter = await registry.register(
        Registration("style", "gemma-3-270m", Format.PEFT, f"file://{peft_dir}")
    )
    assert adapter.record.sha256 == tree_sha256(peft_dir)
    assert (adapter.path / "adapter_config.json").is_file()
    (adapter.path / "adapter_model.safetensors").write_bytes(b"swapped")
    with pytest.raises(Internal):
        await registry.get("style")


async def test_peft_directory_must_look_like_peft(
    registry: AdapterRegistry, tmp_path: Path
) -> None:
    with pytest.raises(InvalidArgument, match="not a PEFT adapter"):
        await registry.register(Registration("style", "m", Format.PEFT, str(tmp_path)))


async def test_list_pages_and_filters(registry: AdapterRegistry, lora_file: Path) -> None:
    for name in ("c", "a", "b"):
        await registry.register(gguf(name, lora_file))
    await registry.register(Registration("z", "other-model", Format.GGUF, str(lora_file)))
    page = await registry.list(page_size=2)
    assert [a.record.name for a in page.adapters] == ["a", "b"]
    rest = await registry.list(page_size=2, page_token=page.next_page_token)
    assert [a.record.name for a in rest.adapters] == ["c", "z"]
    assert rest.next_page_token == ""
    only = await registry.list(base_model="other-model")
    assert [a.record.name for a in only.adapters] == ["z"]
    with pytest.raises(InvalidArgument):
        await registry.list(page_token="%%%")


async def test_metadata_survives_a_restart(tmp_path: Path, lora_file: Path) -> None:
    reg = build_registry(config(tmp_path))
    await reg.open()
    await reg.register(gguf("kept", lora_file))
    await reg.close()
    again = build_registry(config(tmp_path))
    await again.open()
    try:
        assert (await again.get("kept")).record.name == "kept"
    finally:
        await again.close()


@pytest.fixture
def http_source(lora_file: Path) -> Iterator[str]:
    """A real HTTP server on loopback serving the adapter file."""

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

    handler = functools.partial(Handler, directory=str(lora_file.parent))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/{lora_file.name}"
    server.shutdown()
    server.server_close()


async def test_register_from_http_uri(
    registry: AdapterRegistry, http_source: str, lora_file: Path
) -> None:
    adapter = await registry.register(gguf("remote", http_source))
    assert same_bytes(adapter.path, lora_file)
    with pytest.raises(InvalidArgument, match="HTTP 404"):
        await registry.register(gguf("missing", http_source + ".nope"))


# --- gRPC: a real server on port 0 and a real stub ---


@pytest.fixture
async def registry_server(tmp_path: Path) -> AsyncIterator[GrpcService]:
    settings = mesh_settings(tmp_path)
    settings.adapters.store_dir = tmp_path / "grpc-store"
    metrics = CollectorRegistry()
    app = build_app(settings.adapters, runtime(settings, metrics))
    endpoint = port0(settings.adapters.endpoint)
    async with GrpcService("adapter-registry", app, endpoint, settings.telemetry, metrics) as svc:
        yield svc


async def test_grpc_register_get_list_delete(registry_server: GrpcService, lora_file: Path) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{registry_server.port}") as channel:
        stub = adapters_pb2_grpc.AdapterRegistryServiceStub(channel)
        reply = await stub.RegisterAdapter(
            adapters_pb2.RegisterAdapterRequest(
                name="tone",
                base_model="gemma-3-270m",
                format=adapters_pb2.ADAPTER_FORMAT_GGUF,
                source=str(lora_file),
                default_scale=0.25,
                tiers=[types_pb2.TIER_LOCAL],
            )
        )
        assert reply.adapter.sha256 == sha_of(lora_file)
        assert reply.adapter.store_path == f"{reply.adapter.sha256}/adapter.gguf"
        assert list(reply.adapter.tiers) == [types_pb2.TIER_LOCAL]
        got = await stub.GetAdapter(adapters_pb2.GetAdapterRequest(name="tone"))
        assert got.adapter.default_scale == pytest.approx(0.25)
        assert same_bytes(Path(got.adapter.path), lora_file)
        listed = await stub.ListAdapters(adapters_pb2.ListAdaptersRequest())
        assert [a.name for a in listed.adapters] == ["tone"]

        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.RegisterAdapter(
                adapters_pb2.RegisterAdapterRequest(
                    name="tone", base_model="m", format=adapters_pb2.ADAPTER_FORMAT_GGUF,
                    source=str(lora_file),
                )
            )  # fmt: skip
        assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.RegisterAdapter(
                adapters_pb2.RegisterAdapterRequest(name="x", base_model="m")
            )
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT

        await stub.DeleteAdapter(adapters_pb2.DeleteAdapterRequest(name="tone"))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.GetAdapter(adapters_pb2.GetAdapterRequest(name="tone"))
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND


# --- admin REST in the gateway, over the real gRPC service ---


async def test_admin_rest_endpoints(
    registry_server: GrpcService, lora_file: Path, tmp_path: Path
) -> None:
    from gateway.app import build_app as build_gateway

    settings = mesh_settings(tmp_path)
    settings.gateway.adapter_registry = f"127.0.0.1:{registry_server.port}"
    app = build_gateway(gateway_settings(settings))
    transport = httpx.ASGITransport(app=app)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://gw") as client,
    ):
        body = {
            "name": "tone",
            "base_model": "gemma-3-270m",
            "format": "gguf",
            "source": str(lora_file),
            "default_scale": 0.5,
        }
        created = await client.post("/admin/adapters", json=body)
        assert created.status_code == 201, created.text
        assert created.json()["sha256"] == sha_of(lora_file)
        again = await client.post("/admin/adapters", json=body)
        assert again.status_code == 409
        assert again.json()["error"]["code"] == "already_exists"
        bad = await client.post("/admin/adapters", json={**body, "format": "onnx"})
        assert bad.status_code == 400
        assert bad.json()["error"]["param"] == "format"

        listed = await client.get("/admin/adapters")
        assert [a["name"] for a in listed.json()["data"]] == ["tone"]
        one = await client.get("/admin/adapters/tone")
        assert one.json()["default_scale"] == 0.5
        assert (await client.delete("/admin/adapters/tone")).json()["deleted"] is True
        missing = await client.get("/admin/adapters/tone")
        assert missing.status_code == 404
        assert missing.json()["error"]["type"] == "not_found_error"


async def test_admin_rest_needs_the_admin_key(registry_server: GrpcService, tmp_path: Path) -> None:
    from gateway.app import build_app as build_gateway

    settings = mesh_settings(tmp_path)
    settings.gateway.adapter_registry = f"127.0.0.1:{registry_server.port}"
    settings.gateway.admin_key_sha256 = hashlib.sha256(b"s3cret").hexdigest()
    app = build_gateway(gateway_settings(settings))
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as client,
    ):
        assert (await client.get("/admin/adapters")).status_code == 401
        wrong = await client.get("/admin/adapters", headers={"authorization": "Bearer nope"})
        assert wrong.status_code == 403
        ok = await client.get("/admin/adapters", headers={"authorization": "Bearer s3cret"})
        assert ok.status_code == 200
        assert ok.json()["data"] == []
