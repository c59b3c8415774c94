"""Builds inference-local from settings: the engine and the models to load at start."""

from __future__ import annotations

import asyncio

import grpc
from prometheus_client import CollectorRegistry

from inference_local.engine import Engine, ModelSpec
from inference_local.models import ensure_model_file
from inference_local.servicer import InferenceServicer
from slm.config import InferenceLocalConfig, Settings
from slm.v1 import inference_pb2, inference_pb2_grpc


class InferenceLocalApp:
    service_names: tuple[str, ...] = (
        inference_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name,
    )

    def __init__(self, config: InferenceLocalConfig, registry: CollectorRegistry) -> None:
        self.config = config
        self.engine = Engine(registry, max_queue=config.max_queue)

    def add_to_server(self, server: grpc.aio.Server) -> None:
        inference_pb2_grpc.add_InferenceServiceServicer_to_server(
            InferenceServicer(self.engine), server
        )

    async def start(self) -> None:
        for entry in self.config.models:
            path = await asyncio.to_thread(ensure_model_file, self.config.models_dir, entry)
            await self.engine.load(
                ModelSpec(
                    name=entry.name,
                    path=path,
                    context_length=entry.context_length,
                    chat_template=entry.chat_template,
                    n_threads=entry.n_threads,
                )
            )

    async def stop(self) -> None:
        await self.engine.close()


def build_app(settings: Settings, registry: CollectorRegistry) -> InferenceLocalApp:
    return InferenceLocalApp(settings.inference_local, registry)
