"""The admin key guard shared by every /admin/* route of the gateway."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging

from fastapi import Request

from gateway.config import GatewayConfig
from gateway.errors import HttpError, for_status

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

    def check(self, request: Request) -> HttpError | None:
        """None when the caller may use the admin API, else the error to answer with.

        Routes use it as `if (denied := guard.check(request)): return denied.response()`.
        """
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
