"""Builds the Doorman from settings: channels to its tiers and the ledger."""

from __future__ import annotations

import grpc
from prometheus_client import CollectorRegistry

from doorman.core import Doorman, DoormanMetrics, Upstream
from doorman.servicer import DoormanServicer
from slm.config import DoormanConfig, Settings, TelemetryConfig
from slm.discovery import Resolver, StaticResolver, build_resolver, connect
from slm.v1 import doorman_pb2, doorman_pb2_grpc, inference_pb2_grpc, ledger_pb2_grpc, types_pb2


class DoormanApp:
    service_names: tuple[str, ...] = (
        doorman_pb2.DESCRIPTOR.services_by_name["DoormanService"].full_name,
    )

    def __init__(
        self,
        config: DoormanConfig,
        telemetry_config: TelemetryConfig,
        registry: CollectorRegistry,
        resolver: Resolver | None = None,
    ) -> None:
        self.config = config
        resolver = resolver or StaticResolver()
        # Channels connect lazily, so the Doorman starts even while its upstreams are still loading.
        self._channels = [
            connect(resolver, config.inference_local, telemetry_config),
            connect(resolver, config.ledger, telemetry_config),
        ]
        local = Upstream(
            tier=types_pb2.TIER_LOCAL,
            address=config.inference_local,
            stub=inference_pb2_grpc.InferenceServiceStub(self._channels[0]),
        )
        self.doorman = Doorman(
            local,
            ledger_pb2_grpc.LedgerServiceStub(self._channels[1]),
            DoormanMetrics(registry),
            config.default_timeout_s,
        )

    def add_to_server(self, server: grpc.aio.Server) -> None:
        doorman_pb2_grpc.add_DoormanServiceServicer_to_server(DoormanServicer(self.doorman), server)

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        await self.doorman.drain()
        for channel in self._channels:
            await channel.close(None)


def build_app(settings: Settings, registry: CollectorRegistry) -> DoormanApp:
    resolver = build_resolver(settings.discovery)
    return DoormanApp(settings.doorman, settings.telemetry, registry, resolver)
