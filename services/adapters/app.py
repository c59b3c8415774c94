"""Builds the adapter registry service from its configuration section."""

from __future__ import annotations

import grpc

from adapters.artefacts import ArtefactStore
from adapters.config import AdapterRegistryConfig
from adapters.metadata import MetadataStore, SqliteMetadata
from adapters.registry import AdapterRegistry
from adapters.servicer import AdapterRegistryServicer
from slm.runtime import Runtime
from slm.v1 import adapters_pb2, adapters_pb2_grpc


class AdapterRegistryApp:
    service_names: tuple[str, ...] = (
        adapters_pb2.DESCRIPTOR.services_by_name["AdapterRegistryService"].full_name,
    )

    def __init__(self, registry: AdapterRegistry) -> None:
        self.registry = registry

    def add_to_server(self, server: grpc.aio.Server) -> None:
        adapters_pb2_grpc.add_AdapterRegistryServiceServicer_to_server(
            AdapterRegistryServicer(self.registry), server
        )

    async def start(self) -> None:
        await self.registry.open()

    async def stop(self) -> None:
        await self.registry.close()


def metadata_store(config: AdapterRegistryConfig) -> MetadataStore:
    if config.backend == "postgresql":
        from adapters.postgres import PostgresMetadata

        if not config.postgres_dsn:
            raise ValueError(
                "adapters: backend = 'postgresql' needs postgres_dsn (SLM_ADAPTERS__POSTGRES_DSN)"
            )

        return PostgresMetadata(config.postgres_dsn)
    return SqliteMetadata(config.database)


def build_registry(config: AdapterRegistryConfig) -> AdapterRegistry:
    store = ArtefactStore(config.store_dir, config.source_dirs, config.max_artefact_bytes)
    return AdapterRegistry(store, metadata_store(config))


def build_app(config: AdapterRegistryConfig, runtime: Runtime) -> AdapterRegistryApp:
    return AdapterRegistryApp(build_registry(config))
