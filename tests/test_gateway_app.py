"""The gateway app in-process, through httpx's ASGI transport: the paths that need no Doorman."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import httpx
import pytest
from fastapi import FastAPI
from helpers import free_port, gateway_settings

import slm
from gateway.app import build_app
from gateway.config import GatewayConfig
from mesh.settings import Settings

LIMIT = 4096
CHAT = "/v1/chat/completions"


@pytest.fixture
async def app() -> AsyncIterator[FastAPI]:
    # Nothing listens on the Doorman's port: every path here must answer without it.
    settings = Settings(
        gateway=GatewayConfig(doorman=f"127.0.0.1:{free_port()}", max_body_bytes=LIMIT)
    )
    app = build_app(gateway_settings(settings))
    async with app.router.lifespan_context(app):
        yield app


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
        yield client


async def test_liveness_and_version(client: httpx.AsyncClient) -> None:
    health = await client.get("/healthz")
    assert (health.status_code, health.json()) == (200, {"status": "ok"})
    version = await client.get("/version")
    assert version.json() == {"version": slm.__version__}


async def test_request_id_is_echoed_or_made(client: httpx.AsyncClient) -> None:
    echoed = await client.get("/healthz", headers={"x-request-id": "from-envoy"})
    assert echoed.headers["x-request-id"] == "from-envoy"
    made = await client.get("/healthz")
    assert len(made.headers["x-request-id"]) == 32


async def test_not_ready_without_a_doorman(client: httpx.AsyncClient) -> None:
    response = await client.get("/readyz")
    assert response.status_code == 503


async def test_doorman_down_is_a_server_fault(client: httpx.AsyncClient) -> None:
    response = await client.get("/v1/models")
    assert response.status_code == 503
    assert response.json()["error"]["type"] == "server_error"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": [{"role": "user", "content": "hi"}]}, "model"),
        ({"model": "m", "messages": [{"role": "user", "content": "hi"}], "top_p": 0}, "top_p"),
        ({"model": "m", "messages": [{"role": "user", "content": "hi"}], "n": 9}, "n"),
        ({"model": "m", "messages": [{"role": "user", "content": "hi"}], "foo": 1}, "foo"),
        ({"model": "m", "messages": [{"role": "bot", "content": "hi"}]}, "messages[0].role"),
    ],
)
async def test_invalid_requests_are_400_in_openai_shape(
    client: httpx.AsyncClient, body: dict[str, object], param: str
) -> None:
    response = await client.post(CHAT, json=body, headers={"x-request-id": "r1"})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"
    assert set(error) == {"message", "type", "param", "code"}
    assert response.headers["x-request-id"] == "r1"


async def test_broken_json_is_400(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/completions", content=b'{"model": ')
    assert response.status_code == 400
    assert response.json()["error"]["param"] is None


async def test_completion_prompt_list_is_400(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/completions", json={"model": "m", "prompt": ["a", "b"]})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "prompt"


async def test_body_over_the_limit_is_413(client: httpx.AsyncClient) -> None:
    big = {"model": "m", "messages": [{"role": "user", "content": "x" * LIMIT}]}
    response = await client.post(CHAT, json=big)
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"


async def test_streamed_body_over_the_limit_is_413(client: httpx.AsyncClient) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        # No Content-Length: the limit must hold while reading, too.
        for _ in range(8):
            yield b" " * 1024

    response = await client.post(CHAT, content=chunks())
    assert response.status_code == 413


async def test_unknown_route_is_404_in_openai_shape(client: httpx.AsyncClient) -> None:
    response = await client.get("/v1/nothing")
    assert response.status_code == 404
    assert response.json()["error"]["type"] == "not_found_error"


async def test_metrics_count_requests_by_route_and_status(client: httpx.AsyncClient) -> None:
    await client.post(CHAT, json={"model": "m", "messages": []})
    text = (await client.get("/metrics")).text
    assert (
        'slm_gateway_requests_total{method="POST",route="/v1/chat/completions",status="400"} 1.0'
        in text
    )
    # TTFT has no samples until a token arrives; the instrument is declared regardless.
    assert "# TYPE slm_gateway_time_to_first_token_seconds histogram" in text
    assert 'slm_gateway_request_duration_seconds_count{route="/v1/chat/completions"} 1.0' in text


async def test_each_app_has_its_own_registry() -> None:
    # Two apps in one process (tests, or two gateways) must not collide on metric names.
    settings = Settings()
    build_app(gateway_settings(settings))
    build_app(gateway_settings(settings))


async def test_openapi_documents_the_request_bodies(client: httpx.AsyncClient) -> None:
    schema = (await client.get("/openapi.json")).json()
    chat = schema["paths"][CHAT]["post"]["requestBody"]["content"]["application/json"]
    assert chat["schema"] == {"$ref": "#/components/schemas/ChatCompletionRequest"}
    components = schema["components"]["schemas"]
    assert {"ChatCompletionRequest", "CompletionRequest", "ChatMessage"} <= set(components)
    assert "#/$defs/" not in json.dumps(schema)


async def test_a_fault_is_a_500_and_the_app_does_not_raise_past_it(app: FastAPI) -> None:
    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("a bug")

    # raise_app_exceptions: an exception that left the app (as Starlette's ServerErrorMiddleware
    # re-raises after its 500) fails here; under uvicorn it closed the connection, which Envoy
    # may have handed the next request already.
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=True)
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
        response = await client.get("/boom")
        assert response.status_code == 500
        assert response.json()["error"]["type"] == "server_error"
        assert "a bug" not in response.text
        assert response.headers["x-request-id"]


async def test_openapi_says_400_where_fastapi_would_say_422(client: httpx.AsyncClient) -> None:
    schema = (await client.get("/openapi.json")).json()
    statuses = {
        status
        for operations in schema["paths"].values()
        for operation in operations.values()
        for status in operation["responses"]
    }
    assert "422" not in statuses
    assert "HTTPValidationError" not in schema["components"]["schemas"]
