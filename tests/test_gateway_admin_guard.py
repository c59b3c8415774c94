"""The admin key guard: open only on loopback without a key, else a hashed key is required."""

from __future__ import annotations

import hashlib
from pathlib import Path

import httpx
from helpers import gateway_settings, mesh_settings
from starlette.requests import Request

from gateway.admin import AdminGuard
from gateway.app import build_app
from gateway.config import GatewayConfig


def request(authorization: str | None) -> Request:
    headers = [(b"authorization", authorization.encode())] if authorization else []
    return Request({"type": "http", "method": "GET", "path": "/admin", "headers": headers})


def test_open_without_key_only_on_loopback() -> None:
    assert AdminGuard(GatewayConfig()).check(request(None)) is None
    denied = AdminGuard(GatewayConfig(host="0.0.0.0")).check(request(None))
    assert denied is not None
    assert denied.status == 403


def test_hashed_key_is_required_when_configured() -> None:
    guard = AdminGuard(GatewayConfig(admin_key_sha256=hashlib.sha256(b"s3cret").hexdigest()))
    missing = guard.check(request(None))
    wrong = guard.check(request("Bearer nope"))
    assert (missing.status if missing else 0, wrong.status if wrong else 0) == (401, 403)
    assert guard.check(request("Bearer s3cret")) is None


async def test_every_admin_route_of_the_app_is_guarded(tmp_path: Path) -> None:
    """Walks the built app's documented routes, so a route added under /admin without the
    guard fails."""
    settings = mesh_settings(tmp_path)
    settings.gateway.admin_key_sha256 = hashlib.sha256(b"s3cret").hexdigest()
    app = build_app(gateway_settings(settings))
    admin = [
        (method.upper(), path.replace("{name}", "x"))
        for path, operations in app.openapi()["paths"].items()
        if path.startswith("/admin/")
        for method in operations
    ]
    assert len(admin) >= 10
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as client,
    ):
        for method, path in admin:
            missing = await client.request(method, path, json={})
            wrong = await client.request(
                method, path, json={}, headers={"authorization": "Bearer nope"}
            )
            assert (missing.status_code, wrong.status_code) == (401, 403), (method, path)
            assert missing.json() == {
                "error": {
                    "message": "admin key required",
                    "type": "authentication_error",
                    "param": None,
                    "code": "unauthenticated",
                }
            }
            assert wrong.json()["error"]["type"] == "permission_error"
        metrics = await client.get("/admin/metrics", headers={"authorization": "Bearer s3cret"})
        assert metrics.status_code == 200
        assert "slm_gateway_requests_total" in metrics.text
