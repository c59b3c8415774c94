"""/admin/models fanned out over inference-local replicas: one real server and one that is down."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from helpers import DEFAULT_MODEL, free_port, gateway_settings, mesh_settings

from gateway.admin_models import TIERS
from gateway.app import build_app
from slm.server import GrpcService

FILE = "gemma-3-270m-q4_k_m.gguf"


@pytest.fixture
async def replicas(inference_server: GrpcService) -> tuple[str, str]:
    """A live replica, and an address where nothing listens (a replica that is down)."""
    return f"127.0.0.1:{inference_server.port}", f"127.0.0.1:{free_port()}"


@pytest.fixture
async def client(replicas: tuple[str, str], tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    settings = mesh_settings(tmp_path)
    settings.gateway.inference_local = ",".join(replicas)
    app = build_app(gateway_settings(settings))
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://gw", timeout=120
        ) as c,
    ):
        yield c


async def test_listing_names_each_replica_and_what_it_holds(
    client: httpx.AsyncClient, replicas: tuple[str, str]
) -> None:
    live, down = replicas
    listed = await client.get("/admin/models")
    assert listed.status_code == 200, listed.text
    body = listed.json()
    # The replica that is down is reported, not hidden.
    assert [(r["address"], r["ok"]) for r in body["replicas"]] == [(live, True), (down, False)]
    assert body["replicas"][1]["error"]["status"] == 503
    default = {m["id"]: m for m in body["data"]}[DEFAULT_MODEL]
    assert default["loaded"] is True
    # Loaded at start: weights and context in memory, which the replica counts.
    assert default["state"] == "ready"
    assert default["memory_bytes"] > default["size_bytes"] > 0
    assert default["tier"] in TIERS
    assert default["replicas"] == [
        {"address": live, "loaded": True, "state": "ready", "memory_bytes": default["memory_bytes"]}
    ]


async def test_load_and_unload_report_the_replica_that_failed(
    client: httpx.AsyncClient, replicas: tuple[str, str]
) -> None:
    live, down = replicas
    loaded = await client.post("/admin/models/load", json={"name": "twin", "path": FILE})
    # Loaded on one replica of two is not loaded: the caller must hear which one failed.
    assert loaded.status_code == 503, loaded.text
    error = loaded.json()["error"]
    assert down in error["message"]
    assert live not in error["message"]
    report = {r["address"]: r for r in loaded.json()["replicas"]}
    assert report[live] == {"address": live, "ok": True}
    assert report[down]["ok"] is False

    listed = {m["id"]: m for m in (await client.get("/admin/models")).json()["data"]}
    assert [(r["address"], r["loaded"]) for r in listed["twin"]["replicas"]] == [(live, True)]

    unloaded = await client.post("/admin/models/unload", json={"name": "twin"})
    assert unloaded.status_code == 503
    assert down in unloaded.json()["error"]["message"]
    assert "twin" not in {m["id"] for m in (await client.get("/admin/models")).json()["data"]}


async def test_unloading_asks_the_replica_that_is_down_too(
    client: httpx.AsyncClient, replicas: tuple[str, str]
) -> None:
    live, down = replicas
    # The live replica does not hold it, which is fine; the one that is down might.
    missing = await client.post("/admin/models/unload", json={"name": "no-such-model"})
    assert missing.status_code == 503
    assert down in missing.json()["error"]["message"]
    report = {r["address"]: r for r in missing.json()["replicas"]}
    assert report[live] == {"address": live, "ok": True}


async def test_a_field_load_does_not_take_is_refused(client: httpx.AsyncClient) -> None:
    bad = await client.post("/admin/models/load", json={"name": "x", "path": FILE, "gpu": 1})
    assert bad.status_code == 400
    assert bad.json()["error"]["param"] == "gpu"


async def test_every_replica_refusing_alike_keeps_its_status(
    inference_server: GrpcService, tmp_path: Path
) -> None:
    settings = mesh_settings(tmp_path)
    settings.gateway.inference_local = f"127.0.0.1:{inference_server.port}"
    app = build_app(gateway_settings(settings))
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as c,
    ):
        refused = await c.post("/admin/models/load", json={"name": "evil", "path": "/etc/passwd"})
        assert refused.status_code == 400
        assert "outside the model directories" in refused.json()["error"]["message"]
        missing = await c.post("/admin/models/unload", json={"name": "no-such-model"})
        assert missing.status_code == 404
        assert missing.json()["replicas"][0]["ok"] is False
