"""The admin key guard: open only on loopback without a key, else a hashed key is required."""

from __future__ import annotations

import hashlib

from starlette.requests import Request

from gateway.admin import AdminGuard
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
