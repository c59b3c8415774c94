"""Builds inference-local from settings: the engine, its models, and the gRPC servicer."""

from __future__ import annotations

import grpc
from prometheus_client import CollectorRegistry

from inference_local.adapters import RegistryAdapters
from inference_local.engine import Engine
from inference_local.servicer import InferenceServicer
from slm.config import InferenceLocalConfig, Settings
from slm.v1 import inference_pb2, inference_pb2_grpc


class InferenceLocalApp:
    service_names: tuple[str, ...] = (
        inference_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name,
    )

    def __init__(
        self,
        config: InferenceLocalConfig,
        registry: CollectorRegistry,
        adapters: RegistryAdapters | None = None,
    ) -> None:
        self.config = config
        self._adapters = adapters
        self.engine = Engine(config, registry, adapters)

    def add_to_server(self, server: grpc.aio.Server) -> None:
        inference_pb2_grpc.add_InferenceServiceServicer_to_server(
            InferenceServicer(self.engine), server
        )

    async def start(self) -> None:
        await self.engine.start()

    async def stop(self) -> None:
        await self.engine.close()
        if self._adapters is not None:
            await self._adapters.close()


def build_app(settings: Settings, registry: CollectorRegistry) -> InferenceLocalApp:
    config = settings.inference_local
    adapters = (
        RegistryAdapters(config.adapter_registry, settings.telemetry)
        if config.adapter_registry
        else None
    )
    return InferenceLocalApp(config, registry, adapters)
