"""What the composition root hands every service besides its own configuration section."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry

from slm.config import DiscoveryConfig, TelemetryConfig
from slm.discovery import Connector


@dataclass(frozen=True)
class Runtime:
    """Shared by every part of one process: telemetry settings, the one Connector every gRPC
    hop goes through, and the Prometheus registry the process serves."""

    telemetry: TelemetryConfig
    connector: Connector
    registry: CollectorRegistry

    @classmethod
    def create(
        cls,
        telemetry: TelemetryConfig | None = None,
        discovery: DiscoveryConfig | None = None,
        registry: CollectorRegistry | None = None,
    ) -> Runtime:
        """A runtime for one process; must be made inside its event loop. Close it with
        `close` (the connector's channels)."""
        telemetry = telemetry or TelemetryConfig()
        return cls(
            telemetry=telemetry,
            connector=Connector(discovery or DiscoveryConfig(), telemetry),
            registry=registry or CollectorRegistry(),
        )

    async def close(self) -> None:
        await self.connector.close()
