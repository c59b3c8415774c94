"""Builds the kv-cache tiers from config; the Mooncake client is imported only when chosen."""

from __future__ import annotations

from collections.abc import Callable

from kvcache.config import KVCacheConfig, MooncakeConfig
from kvcache.store import DiskTier, KVStore, MemoryTier, MooncakeTier, ObjectStore, Tier
from slm.errors import FailedPrecondition

MB = 1 << 20

MooncakeFactory = Callable[[MooncakeConfig], ObjectStore]


def connect_mooncake(config: MooncakeConfig) -> ObjectStore:
    """A MooncakeDistributedStore set up against the configured master."""
    try:
        from mooncake.store import MooncakeDistributedStore  # type: ignore[import-not-found]
    except ImportError as error:
        raise FailedPrecondition(
            "kv_cache.backend = 'mooncake' needs the optional extra: "
            "pip install 'service-slm[mooncake]'"
        ) from error
    store = MooncakeDistributedStore()
    rc = store.setup(
        config.local_hostname,
        config.metadata_server,
        config.global_segment_size_mb * MB,
        config.local_buffer_size_mb * MB,
        config.protocol,
        config.device_name,
        config.master_server_address,
    )
    if rc != 0:
        raise FailedPrecondition(
            f"Mooncake store setup failed ({rc}) against master {config.master_server_address}"
        )
    return store  # type: ignore[no-any-return]


def build_store(config: KVCacheConfig, mooncake: MooncakeFactory = connect_mooncake) -> KVStore:
    tiers: list[Tier] = []
    if config.memory_mb:
        tiers.append(MemoryTier(config.memory_mb * MB))
    if config.disk_mb:
        tiers.append(DiskTier(config.disk_dir, config.disk_mb * MB))
    if config.backend == "mooncake":
        tiers.append(MooncakeTier(mooncake(config.mooncake)))
    return KVStore(tiers)
