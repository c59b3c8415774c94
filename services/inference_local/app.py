"""Builds inference-local from its section: the engine, its models, and the gRPC servicer."""

from __future__ import annotations

import logging

import grpc
from prometheus_client import CollectorRegistry

from inference_local.adapters import RegistryAdapters
from inference_local.config import InferenceLocalConfig
from inference_local.engine import Engine
from inference_local.manifest import MB, budgets_of
from inference_local.prefix_cache import KVCacheClient, PrefixCache, PrefixCacheMetrics
from inference_local.servicer import InferenceServicer
from slm.errors import SlmError
from slm.runtime import Runtime
from slm.v1 import inference_pb2, inference_pb2_grpc

log = logging.getLogger(__name__)


# What a SIGHUP applies: the manifest.
_RELOADED = {"models", "resident_budget_mb", "standby_budget_mb"}


class InferenceLocalApp:
    service_names: tuple[str, ...] = (
        inference_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name,
    )

    def __init__(
        self,
        config: InferenceLocalConfig,
        registry: CollectorRegistry,
        adapters: RegistryAdapters | None = None,
        prefix_cache: PrefixCache | None = None,
    ) -> None:
        self.config = config
        self._adapters = adapters
        self._prefix_cache = prefix_cache
        self.engine = Engine(config, registry, adapters, prefix_cache)

    def add_to_server(self, server: grpc.aio.Server) -> None:
        inference_pb2_grpc.add_InferenceServiceServicer_to_server(
            InferenceServicer(self.engine), server
        )

    async def start(self) -> None:
        await self.engine.start()

    async def reload(self, config: InferenceLocalConfig) -> None:
        """On SIGHUP: apply the config file's model manifest (models and tier budgets) with a
        drain, as the admin API does. Other settings take effect at the next start: a changed
        one is named in a warning, not taken in silence."""
        running = self.engine.config.model_dump(exclude=_RELOADED)
        pending = sorted(
            k for k, v in config.model_dump(exclude=_RELOADED).items() if running[k] != v
        )
        if pending:
            log.warning(
                "SIGHUP: these settings changed and take effect at the next start",
                extra={"settings": pending},
            )
        # An unset tier budget falls back to the memory budget in force, not to the file's: a
        # changed memory_budget_mb is among the settings left for the next start.
        running_total = self.engine.config.memory_budget_mb
        budgets = budgets_of(config.model_copy(update={"memory_budget_mb": running_total}))
        try:
            result = await self.engine.apply_manifest(
                config.models,
                resident_budget_mb=budgets.resident // MB,
                standby_budget_mb=budgets.standby // MB,
            )
        except SlmError as error:
            log.error(
                "SIGHUP: manifest refused; the one in force stays",
                extra={"reason": error.reason, "error": error.message},
            )
            return
        change = result.change
        log.info(
            "SIGHUP: manifest reloaded",
            extra={
                "added": list(change.added),
                "removed": list(change.removed),
                "changed": list(change.changed),
                "kept": list(change.kept),
            },
        )

    async def stop(self) -> None:
        await self.engine.close()
        if self._prefix_cache is not None:
            await self._prefix_cache.close()
        if self._adapters is not None:
            await self._adapters.close()


def build_app(config: InferenceLocalConfig, runtime: Runtime) -> InferenceLocalApp:
    connector = runtime.connector
    adapters = (
        RegistryAdapters(connector, config.adapter_registry) if config.adapter_registry else None
    )
    prefix_cache = None
    if config.kv_cache or config.prefix_cache_mb:
        prefix_cache = PrefixCache(
            config.prefix_block_tokens,
            config.prefix_cache_mb << 20,
            KVCacheClient(connector.channel(config.kv_cache)) if config.kv_cache else None,
            PrefixCacheMetrics(runtime.registry),
        )
    return InferenceLocalApp(config, runtime.registry, adapters, prefix_cache)
