"""/admin/adapters over HTTP, through the gateway app: what is refused before the registry."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from helpers import free_port, gateway_settings, mesh_settings

from gateway.app import build_app


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    # No registry listens: a request that got past the gateway's checks would be a 503.
    settings = mesh_settings(tmp_path)
    settings.gateway.adapter_registry = f"127.0.0.1:{free_port()}"
    app = build_app(gateway_settings(settings))
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://gw") as client,
    ):
        yield client


@pytest.mark.parametrize(
    ("query", "param"),
    [
        # Past uint32: it reached protobuf as a ValueError, a 500 and a dropped connection.
        ("page_size=1837098970879", "page_size"),
        ("page_size=1001", "page_size"),
        ("page_size=-1", "page_size"),
        ("page_size=ten", "page_size"),
    ],
)
async def test_a_page_size_out_of_range_is_400_naming_it(
    client: httpx.AsyncClient, query: str, param: str
) -> None:
    response = await client.get(f"/admin/adapters?{query}")
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"name": "Upper", "base_model": "m", "format": "gguf", "source": "a"}, "name"),
        ({"name": "a", "base_model": "", "format": "gguf", "source": "a"}, "base_model"),
        (
            {"name": "a", "base_model": "m", "format": "gguf", "source": "a", "sha256": "x"},
            "sha256",
        ),
        (
            {"name": "a", "base_model": "m", "format": "gguf", "source": "a", "default_scale": 5},
            "default_scale",
        ),
    ],
)
async def test_a_registration_the_registry_would_refuse_is_400_naming_the_field(
    client: httpx.AsyncClient, body: dict[str, object], param: str
) -> None:
    response = await client.post("/admin/adapters", json=body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


async def test_a_name_outside_the_registrys_rule_is_400(client: httpx.AsyncClient) -> None:
    for method in ("GET", "DELETE"):
        response = await client.request(method, "/admin/adapters/Not%20A%20Name")
        assert response.status_code == 400, response.text
        assert response.json()["error"]["param"] == "name"


async def test_the_document_states_the_bounds(client: httpx.AsyncClient) -> None:
    document = (await client.get("/openapi.json")).json()
    listing = document["paths"]["/admin/adapters"]["get"]
    page_size = next(p for p in listing["parameters"] if p["name"] == "page_size")["schema"]
    assert (page_size["minimum"], page_size["maximum"]) == (0, 1000)
    register = document["paths"]["/admin/adapters"]["post"]
    body = register["requestBody"]["content"]["application/json"]["schema"]
    assert body["properties"]["default_scale"]["anyOf"][0]["maximum"] == 4.0
    links = register["responses"]["201"]["links"]
    assert {link["operationId"] for link in links.values()} == {"get_adapter", "delete_adapter"}
