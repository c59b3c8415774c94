"""Builds inference-local from settings: the engine, its models, and the gRPC servicer."""

from __future__ import annotations

import grpc
from prometheus_client import CollectorRegistry

from inference_local.engine import AdapterResolver, Engine
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
        adapters: AdapterResolver | None = None,
    ) -> None:
        self.config = config
        self.engine = Engine(config, registry, adapters)

    def add_to_server(self, server: grpc.aio.Server) -> None:
        inference_pb2_grpc.add_InferenceServiceServicer_to_server(
            InferenceServicer(self.engine), server
        )

    async def start(self) -> None:
        await self.engine.start()

    async def stop(self) -> None:
        await self.engine.close()


def build_app(settings: Settings, registry: CollectorRegistry) -> InferenceLocalApp:
    return InferenceLocalApp(settings.inference_local, registry)
