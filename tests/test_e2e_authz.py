"""Who may do what, with authentication on as the chart deploys it: through Envoy, every HTTP
route of the gateway's OpenAPI, the chat WebSocket and every DoormanService method refuse a
caller without a key and one with a wrong key; the admin routes refuse a tenant's key too. Health,
readiness and the API's own description (OpenAPI, gRPC reflection, the UI's static shell) stay
open. No key appears in any log or in the ledger."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from helpers import DEFAULT_MODEL, Mesh, mesh_settings
from websockets.asyncio.client import connect

from doorman.auth import hash_api_key
from doorman.config import TenantConfig
from slm.v1 import doorman_pb2, ledger_pb2, ledger_pb2_grpc

TENANT_KEY = "sk-tenant-2f9c1d7e"
ADMIN_KEY = "sk-admin-8b3e5a01"
WRONG_KEY = "sk-wrong-00000000"
# Open to anyone: probes and the API's description of itself.
OPEN = {
    "/healthz",
    "/readyz",
    "/version",
    "/openapi.json",
    "/docs",
    "/docs/oauth2-redirect",
    "/redoc",
}
# Served to the cluster (Prometheus scrapes the gateway's own port), never at the edge.
INTERNAL_ONLY = {"/metrics"}
# Minimal valid bodies, so a refusal is about the key and not the payload.
BODIES: dict[str, Any] = {
    "/v1/chat/completions": {
        "model": DEFAULT_MODEL,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 1,
    },
    "/v1/completions": {"model": DEFAULT_MODEL, "prompt": "hi", "max_tokens": 1},
    "/v1/embeddings": {"model": DEFAULT_MODEL, "input": "hi"},
    "/v1/responses": {"model": DEFAULT_MODEL, "input": "hi", "max_output_tokens": 16},
    "/v1/messages": {
        "model": DEFAULT_MODEL,
        "max_tokens": 1,
        "messages": [{"role": "user", "content": "hi"}],
    },
    "/v1/messages/count_tokens": {
        "model": DEFAULT_MODEL,
        "messages": [{"role": "user", "content": "hi"}],
    },
}


@pytest.fixture(scope="module")
def authz_mesh(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    state = tmp_path_factory.mktemp("authz-mesh")
    settings = mesh_settings(state)
    settings.doorman.tenants = [TenantConfig(name="acme", key_hashes=[hash_api_key(TENANT_KEY)])]
    settings.doorman.auth_required = True
    settings.gateway.admin_key_sha256 = hashlib.sha256(ADMIN_KEY.encode()).hexdigest()
    mesh = Mesh(settings, state / "slm.toml", state / "mesh.log")
    mesh.start()
    yield mesh
    mesh.stop()


def operations(mesh: Mesh) -> list[tuple[str, str]]:
    spec = httpx.get(f"{mesh.base_url}/openapi.json", timeout=30).json()
    found = [
        (method.upper(), re.sub(r"\{[^}]+\}", "x", path))
        for path, item in spec["paths"].items()
        for method in item
        if method in ("get", "post", "put", "patch", "delete") and path not in OPEN | INTERNAL_ONLY
    ]
    assert len(found) >= 15  # the walk must not be vacuous
    return found


def call(mesh: Mesh, method: str, path: str, key: str | None, scheme: str = "bearer") -> int:
    headers = {}
    if key is not None:
        headers = (
            {"x-api-key": key} if scheme == "x-api-key" else {"authorization": f"Bearer {key}"}
        )
    body = BODIES.get(path)
    response = httpx.request(
        method,
        f"{mesh.base_url}{path}",
        headers=headers,
        json=body if method in ("POST", "PUT", "PATCH") else None,
        timeout=60,
    )
    return response.status_code


def test_every_http_route_refuses_a_missing_or_wrong_key(authz_mesh: Mesh) -> None:
    allowed = {
        (method, path, key is None): status
        for method, path in operations(authz_mesh)
        for key in (None, WRONG_KEY)
        if (status := call(authz_mesh, method, path, key)) not in (401, 403)
    }
    assert allowed == {}


def test_anthropic_routes_refuse_a_wrong_x_api_key(authz_mesh: Mesh) -> None:
    for path in ("/v1/messages", "/v1/messages/count_tokens"):
        assert call(authz_mesh, "POST", path, WRONG_KEY, scheme="x-api-key") in (401, 403)


def test_admin_routes_refuse_a_tenant_key_and_take_the_admin_key(authz_mesh: Mesh) -> None:
    admin = [(m, p) for m, p in operations(authz_mesh) if p.startswith("/admin")]
    assert admin
    assert {(m, p): s for m, p in admin if (s := call(authz_mesh, m, p, TENANT_KEY)) != 403} == {}
    # The admin key itself gets through the guard (what follows may be a 404 for "x").
    assert call(authz_mesh, "GET", "/admin/ledger/verify", ADMIN_KEY) == 200


def test_internal_routes_are_not_served_at_the_edge(authz_mesh: Mesh) -> None:
    for path in INTERNAL_ONLY:
        assert call(authz_mesh, "GET", path, None) == 404
        assert call(authz_mesh, "GET", path, ADMIN_KEY) == 404


def test_open_routes_stay_open(authz_mesh: Mesh) -> None:
    for path in ("/healthz", "/readyz", "/openapi.json"):
        assert httpx.get(f"{authz_mesh.base_url}{path}", timeout=30).status_code == 200


def test_a_tenant_key_is_served(authz_mesh: Mesh) -> None:
    # The refusals above are about keys: the right one is answered.
    assert call(authz_mesh, "POST", "/v1/chat/completions", TENANT_KEY) == 200


async def test_the_websocket_refuses_a_missing_or_wrong_key(authz_mesh: Mesh) -> None:
    url = f"ws://127.0.0.1:{authz_mesh.settings.envoy.port}/v1/chat/completions/ws"
    for key in (None, WRONG_KEY):
        message = dict(BODIES["/v1/chat/completions"])
        if key is not None:
            message["api_key"] = key
        async with connect(url, origin=None) as socket:
            await socket.send(json.dumps(message))
            frames = [await socket.recv() for _ in range(2)]
        error = json.loads(frames[0])["error"]
        assert error["code"] in ("no_api_key", "invalid_api_key")
        assert frames[1] == "[DONE]"


CALLERS = (("none", ()), ("wrong", (("authorization", f"Bearer {WRONG_KEY}"),)))


async def test_every_doorman_method_refuses_a_missing_or_wrong_key(authz_mesh: Mesh) -> None:
    service = doorman_pb2.DESCRIPTOR.services_by_name["DoormanService"]
    requests = {
        "Chat": doorman_pb2.ChatRequest(model=DEFAULT_MODEL),
        "Complete": doorman_pb2.CompleteRequest(model=DEFAULT_MODEL, prompt="hi"),
        "ListModels": doorman_pb2.DoormanServiceListModelsRequest(),
        "Embed": doorman_pb2.DoormanServiceEmbedRequest(model=DEFAULT_MODEL),
        "CountTokens": doorman_pb2.DoormanServiceCountTokensRequest(model=DEFAULT_MODEL),
    }
    assert set(requests) == {m.name for m in service.methods}
    codes: dict[tuple[str, str], grpc.StatusCode] = {}
    async with grpc.aio.insecure_channel(authz_mesh.grpc_target) as channel:
        for method in service.methods:
            path = f"/{service.full_name}/{method.name}"
            kind = channel.unary_stream if method.server_streaming else channel.unary_unary
            rpc = kind(path, request_serializer=lambda m: m.SerializeToString())
            for label, metadata in (
                ("none", ()),
                ("wrong", (("authorization", f"Bearer {WRONG_KEY}"),)),
            ):
                try:
                    if method.server_streaming:
                        async for _ in rpc(requests[method.name], metadata=metadata, timeout=30):
                            pass
                    else:
                        await rpc(requests[method.name], metadata=metadata, timeout=30)
                except grpc.aio.AioRpcError as error:
                    codes[(method.name, label)] = error.code()
                else:
                    codes[(method.name, label)] = grpc.StatusCode.OK
    refused = {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED}
    assert {k: c for k, c in codes.items() if c not in refused} == {}


async def test_no_key_in_logs_or_ledger(authz_mesh: Mesh) -> None:
    log = authz_mesh.log_path.read_text(errors="replace")
    async with grpc.aio.insecure_channel(authz_mesh.settings.ledger.endpoint.address) as channel:
        page = await ledger_pb2_grpc.LedgerServiceStub(channel).List(
            ledger_pb2.ListRequest(page_size=1000), timeout=30
        )
    assert page.records  # the walk above left records
    ledger = str(page)
    for key in (TENANT_KEY, ADMIN_KEY, WRONG_KEY):
        assert key not in log
        assert key not in ledger
