"""PUT /admin/manifest on a real inference-local of the test's own, and the tiers it lists."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from helpers import DEFAULT_MODEL, free_port, gateway_settings, mesh_settings, runtime
from prometheus_client import CollectorRegistry

from gateway.app import build_app
from inference_local.config import InferenceLocalConfig
from slm.server import GrpcService
from slm.v1 import inference_pb2, inference_pb2_grpc, types_pb2

TWIN = "gemma-3-270m-standby"


def default_entry(tier: str) -> dict[str, Any]:
    """The configured default model as a manifest entry, unchanged but for its tier."""
    configured = InferenceLocalConfig().models[0]
    return {
        "name": configured.name,
        "path": configured.path,
        "package": configured.package,
        "context_length": configured.context_length,
        "chat_template": configured.chat_template,
        "tier": tier,
    }


def twin_entry() -> dict[str, Any]:
    """A second name for the bundled GGUF, kept mapped and warmed by the default's requests."""
    return {
        "name": TWIN,
        "path": InferenceLocalConfig().models[0].path,
        "chat_template": InferenceLocalConfig().models[0].chat_template,
        "tier": "standby",
        "co_activation": [DEFAULT_MODEL],
    }


@pytest.fixture
async def engine(model_path: Path, tmp_path: Path) -> AsyncIterator[GrpcService]:
    """inference-local of this test alone: a manifest applied to it leaves other tests' be."""
    from inference_local.app import build_app as build_engine

    settings = mesh_settings(tmp_path)
    registry = CollectorRegistry()
    endpoint = settings.inference_local.endpoint.model_copy(update={"port": 0, "metrics_port": 0})
    async with GrpcService(
        "inference-local",
        build_engine(settings.inference_local, runtime(settings, registry)),
        endpoint,
        settings.telemetry,
        registry,
        serve_metrics=False,
        grace_s=0,
    ) as service:
        yield service


async def gateway_for(addresses: list[str], tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    settings = mesh_settings(tmp_path / "gateway")
    settings.gateway.inference_local = ",".join(addresses)
    app = build_app(gateway_settings(settings))
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://gw", timeout=300
        ) as client,
    ):
        yield client


@pytest.fixture
async def client(engine: GrpcService, tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    async for made in gateway_for([f"127.0.0.1:{engine.port}"], tmp_path):
        yield made


async def listed(client: httpx.AsyncClient) -> dict[str, dict[str, Any]]:
    reply = await client.get("/admin/models")
    assert reply.status_code == 200, reply.text
    return {m["id"]: m for m in reply.json()["data"]}


async def test_a_standby_model_is_added_mapped_and_warmed_by_its_router(
    client: httpx.AsyncClient, engine: GrpcService
) -> None:
    manifest = {"models": [default_entry("resident"), twin_entry()]}
    applied = await client.put("/admin/manifest", json=manifest)
    assert applied.status_code == 200, applied.text
    body = applied.json()
    assert body["dry_run"] is False
    (replica,) = body["replicas"]
    assert replica["ok"] is True
    assert replica["added"] == [TWIN]
    assert replica["removed"] == []
    # The default model's entry differs in its tier alone.
    assert DEFAULT_MODEL in replica["kept"] + replica["changed"]
    assert replica["drain_seconds"] >= 0

    models = await listed(client)
    assert (models[DEFAULT_MODEL]["tier"], models[DEFAULT_MODEL]["state"]) == ("resident", "ready")
    twin = models[TWIN]
    assert (twin["tier"], twin["co_activation"]) == ("standby", [DEFAULT_MODEL])
    # Weights mapped, no context yet: less memory than the resident model holds.
    assert twin["state"] == "mapped"
    assert 0 < twin["memory_bytes"] < models[DEFAULT_MODEL]["memory_bytes"]
    # The report lists what the replica serves now.
    assert {m["id"] for m in body["data"]} == {DEFAULT_MODEL, TWIN}

    # A request for the router model makes its co-activated specialist ready.
    async with grpc.aio.insecure_channel(f"127.0.0.1:{engine.port}") as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        request = inference_pb2.GenerateRequest(
            model=DEFAULT_MODEL, prompt="Hi", sampling=types_pb2.SamplingParams(max_tokens=2)
        )
        [_ async for _ in stub.Generate(request)]
    # The warming may finish after the router's answer, in another server: poll its listing,
    # as the page does.
    async with asyncio.timeout(120):
        while (warmed := (await listed(client))[TWIN])["state"] != "ready":  # noqa: ASYNC110
            await asyncio.sleep(0.05)
    assert warmed["memory_bytes"] > twin["memory_bytes"]


async def test_a_dry_run_reports_and_changes_nothing(client: httpx.AsyncClient) -> None:
    before = await listed(client)
    manifest = {"models": [default_entry("resident"), twin_entry()], "dry_run": True}
    checked = await client.put("/admin/manifest", json=manifest)
    assert checked.status_code == 200, checked.text
    assert checked.json()["dry_run"] is True
    (replica,) = checked.json()["replicas"]
    assert replica["added"] == [TWIN]
    # As it would be: the twin is in the report, not on the replica.
    assert TWIN in {m["id"] for m in replica["models"]}
    after = await listed(client)
    assert TWIN not in after
    assert after[DEFAULT_MODEL]["tier"] == before[DEFAULT_MODEL]["tier"]


async def test_a_budget_too_small_is_refused_with_the_numbers(client: httpx.AsyncClient) -> None:
    before = await listed(client)
    manifest = {"models": [default_entry("resident")], "resident_budget_mb": 77}
    refused = await client.put("/admin/manifest", json=manifest)
    assert refused.status_code == 400, refused.text
    message = refused.json()["error"]["message"]
    # What the tier needs, model by model, against its budget.
    assert "77 MiB" in message, message
    assert f"{DEFAULT_MODEL} " in message, message
    assert refused.json()["replicas"][0]["ok"] is False
    # Refused whole: the replica serves what it served.
    after = await listed(client)
    assert {k: v["tier"] for k, v in after.items()} == {k: v["tier"] for k, v in before.items()}


async def test_applied_everywhere_or_the_replica_that_failed_is_named(
    engine: GrpcService, tmp_path: Path
) -> None:
    live, down = f"127.0.0.1:{engine.port}", f"127.0.0.1:{free_port()}"
    async for client in gateway_for([live, down], tmp_path):
        manifest = {"models": [default_entry("resident"), twin_entry()], "dry_run": True}
        partial = await client.put("/admin/manifest", json=manifest)
        assert partial.status_code == 503, partial.text
        assert down in partial.json()["error"]["message"]
        assert live not in partial.json()["error"]["message"]
        report = {r["address"]: r for r in partial.json()["replicas"]}
        assert (report[live]["ok"], report[down]["ok"]) == (True, False)


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"pinned": True}, "models.0.pinned"),
        ({"tier": "hot"}, "models.0.tier"),
        ({"tier": None}, "models.0.tier"),
        ({"co_activation": [""]}, "models.0.co_activation.0"),
        ({"gpu_layers": -2}, "models.0.gpu_layers"),
        ({"decode_contexts": 17}, "models.0.decode_contexts"),
    ],
)
async def test_a_field_the_manifest_does_not_take_is_refused(
    change: dict[str, Any], param: str, tmp_path: Path
) -> None:
    # Refused before any replica is asked: no replica listens here.
    async for client in gateway_for([f"127.0.0.1:{free_port()}"], tmp_path):
        bad = await client.put(
            "/admin/manifest", json={"models": [{**default_entry("resident"), **change}]}
        )
        assert bad.status_code == 400, bad.text
        assert bad.json()["error"]["param"] == param


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"preload": True}, "preload"),
        ({"models": []}, "models"),
        ({"drain_timeout_s": -1}, "drain_timeout_s"),
        ({"resident_budget_mb": 1.5}, "resident_budget_mb"),
    ],
)
async def test_a_manifest_field_out_of_range_is_refused(
    change: dict[str, Any], param: str, tmp_path: Path
) -> None:
    async for client in gateway_for([f"127.0.0.1:{free_port()}"], tmp_path):
        body = {"models": [default_entry("resident")], **change}
        refused = await client.put("/admin/manifest", json=body)
        assert refused.status_code == 400, refused.text
        assert refused.json()["error"]["param"] == param
