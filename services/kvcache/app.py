"""Builds the kv-cache service from its configuration section."""

from __future__ import annotations

import grpc
from prometheus_client import CollectorRegistry

from kvcache.backends import MB, build_store
from kvcache.config import KVCacheConfig
from kvcache.servicer import KVCacheMetrics, KVCacheServicer
from kvcache.store import KVStore
from slm.runtime import Runtime
from slm.v1 import kvcache_pb2, kvcache_pb2_grpc


class KVCacheApp:
    service_names: tuple[str, ...] = (
        kvcache_pb2.DESCRIPTOR.services_by_name["KVCacheService"].full_name,
    )

    def __init__(self, store: KVStore, registry: CollectorRegistry, max_entry_bytes: int) -> None:
        self.store = store
        self._metrics = KVCacheMetrics(registry)
        self._max = max_entry_bytes

    def add_to_server(self, server: grpc.aio.Server) -> None:
        kvcache_pb2_grpc.add_KVCacheServiceServicer_to_server(
            KVCacheServicer(self.store, self._metrics, self._max), server
        )

    async def start(self) -> None:
        self._metrics.usage(self.store)

    async def stop(self) -> None:
        return None


def build_app(config: KVCacheConfig, runtime: Runtime) -> KVCacheApp:
    return KVCacheApp(build_store(config), runtime.registry, config.max_entry_mb * MB)
