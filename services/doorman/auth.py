"""API keys (stored only as hashes) and the tenants they belong to."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable
from dataclasses import dataclass

from slm.errors import PermissionDenied, Unauthenticated


def hash_api_key(key: str, pepper: str = "") -> str:
    """What the config stores for a key: HMAC-SHA256 with the pepper, or SHA-256 without one."""
    if pepper:
        return hmac.new(pepper.encode(), key.encode(), hashlib.sha256).hexdigest()
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class Tenant:
    name: str
    allowed_models: frozenset[str] = frozenset({"*"})
    # Requests and tokens per minute, concurrent requests; 0 is unlimited.
    rpm: int = 0
    tpm: int = 0
    max_concurrent: int = 0
    # Higher is served first from a tier's queue.
    priority: int = 0

    def allows(self, model: str) -> bool:
        return "*" in self.allowed_models or model in self.allowed_models

    @property
    def limited(self) -> bool:
        return bool(self.rpm or self.tpm or self.max_concurrent)


ANONYMOUS = Tenant(name="anonymous")


@dataclass(frozen=True, slots=True)
class Principal:
    """Who made a request: the tenant, and an id of the key that is safe to record."""

    tenant: Tenant
    key_id: str = ""


ANONYMOUS_PRINCIPAL = Principal(ANONYMOUS)


class Authenticator:
    """Maps the "authorization: Bearer KEY" metadata to a tenant; only hashes are kept."""

    def __init__(
        self, keys: Iterable[tuple[str, Tenant]], *, pepper: str = "", required: bool = True
    ) -> None:
        self._tenants = dict(keys)
        self._pepper = pepper
        self.required = required

    def authenticate(self, authorization: str | None) -> Principal:
        if not self.required:
            return ANONYMOUS_PRINCIPAL
        scheme, _, key = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise Unauthenticated(
                "an API key is required: send 'authorization: Bearer <key>'", reason="NO_API_KEY"
            )
        digest = hash_api_key(key.strip(), self._pepper)
        tenant = self._tenants.get(digest)
        if tenant is None:
            raise Unauthenticated("the API key is not valid", reason="INVALID_API_KEY")
        # The first 12 hex digits name the key in logs and the ledger without revealing it.
        return Principal(tenant, key_id=digest[:12])

    @staticmethod
    def check_model(principal: Principal, model: str) -> None:
        if not principal.tenant.allows(model):
            raise PermissionDenied(
                f"tenant {principal.tenant.name!r} may not use model {model!r}",
                reason="MODEL_NOT_ALLOWED",
                metadata={"model": model},
            )
