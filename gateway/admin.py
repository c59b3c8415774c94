"""The /admin/* API: one router whose dependency checks the admin key for every route in it."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging

from fastapi import APIRouter, Depends, Request
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.responses import Response

from gateway.admin_adapters import adapters_router
from gateway.admin_ledger import ledger_router
from gateway.admin_models import models_router
from gateway.config import GatewayConfig
from gateway.errors import HttpError, Refusal, for_status

log = logging.getLogger(__name__)


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


class AdminGuard:
    """Checks `Authorization: Bearer <admin key>` against the configured SHA-256.

    Keys are compared as hashes in constant time, so the plain key is never stored. With no key
    configured the admin API is open, but only on a loopback-bound gateway; anywhere else every
    admin call is refused.
    """

    def __init__(self, config: GatewayConfig) -> None:
        self._digest = config.admin_key_sha256
        self._open = not self._digest and is_loopback(config.host)
        if self._open:
            log.warning("admin API open without a key: allowed only on loopback")

    def __call__(self, request: Request) -> None:
        """As a FastAPI dependency: raises Refusal (401 or 403) unless the caller may pass."""
        if denied := self.check(request):
            raise Refusal(denied)

    def check(self, request: Request) -> HttpError | None:
        """None when the caller may use the admin API, else the error to answer with."""
        if self._open:
            return None
        if not self._digest:
            return for_status(
                403, "the admin API is disabled: no admin key is configured", "permission_denied"
            )
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not key:
            return for_status(401, "admin key required", "unauthenticated")
        digest = hashlib.sha256(key.encode()).hexdigest()
        if not hmac.compare_digest(digest, self._digest):
            return for_status(403, "invalid admin key", "permission_denied")
        return None


def admin_router(config: GatewayConfig, registry: CollectorRegistry) -> APIRouter:
    """Every /admin/* route: models, adapters, the ledger and this gateway's metrics. The key
    check is this router's dependency, so a route added to any of them cannot skip it."""
    router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[Depends(AdminGuard(config))])
    router.include_router(models_router())
    router.include_router(adapters_router())
    router.include_router(ledger_router())

    @router.get(
        "/metrics",
        response_class=Response,
        responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
    )
    async def metrics() -> Response:
        """This gateway's Prometheus metrics, for the admin page: the edge does not publish
        /metrics (Prometheus scrapes the gateway's own port), so operators see them here."""
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return router
