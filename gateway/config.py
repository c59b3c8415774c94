"""The REST gateway's configuration section."""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import Field

from slm.config import LOOPBACK, DiscoveryConfig, Section, TelemetryConfig


class GatewayConfig(Section):
    host: str = LOOPBACK
    port: int = Field(default=8000, ge=0, le=65535)
    # One address or a comma list: the gateway and Envoy balance over every Doorman it names.
    doorman: str = f"{LOOPBACK}:50051"
    # Limit on JSON bodies the gateway parses, in bytes (Envoy enforces the same).
    max_body_bytes: int = Field(default=1 << 20, ge=1024)
    # Most choices (`n`) one chat or completion request may ask for; above it is a 400.
    max_n: int = Field(default=8, ge=1, le=128)
    # SHA-256 (hex) of the admin key guarding /admin/*. Empty: admin endpoints are open, which
    # is allowed only while the gateway listens on loopback (the embedded default).
    admin_key_sha256: str = Field(default="", pattern=r"^([0-9a-f]{64})?$")
    # Where the admin endpoints reach the services they manage. Every address goes through
    # `[discovery]`, so it may name several instances; the model routes reach each of them.
    inference_local: str = f"{LOOPBACK}:50052"
    ledger: str = f"{LOOPBACK}:50056"
    adapter_registry: str = f"{LOOPBACK}:50055"


@dataclass(frozen=True)
class GatewaySettings:
    """What the gateway reads of the mesh's settings: its own section, and how it reaches and
    reports on the services behind it."""

    gateway: GatewayConfig
    telemetry: TelemetryConfig
    discovery: DiscoveryConfig
