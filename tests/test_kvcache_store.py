"""The kv-cache core: memory LRU, disk persistence and corruption, tier order, backend choice."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvcache.backends import build_store, connect_mooncake
from kvcache.config import KVCacheConfig, MooncakeConfig
from kvcache.store import DiskTier, Entry, Key, KVStore, MemoryTier, MooncakeTier, pack, unpack
from slm.errors import FailedPrecondition


class FakeMooncakeStore:
    """A fake of MooncakeDistributedStore's key/value calls: the real one needs a running
    Mooncake master and transfer engine, which this machine cannot run."""

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}

    def put(self, key: str, value: bytes) -> int:
        self.objects[key] = bytes(value)
        return 0

    def get(self, key: str) -> bytes:
        return self.objects.get(key, b"")

    def is_exist(self, key: str) -> int:
        return 1 if key in self.objects else 0

    def remove(self, key: str) -> int:
        return 0 if self.objects.pop(key, None) is not None else -1


def key(n: int, fingerprint: str = "fp") -> Key:
    return Key(fingerprint, f"h{n}")


def test_pack_round_trip_and_damage_is_detected() -> None:
    blob = pack(Entry(64, b"state" * 100))
    assert unpack(blob) == Entry(64, b"state" * 100)
    flipped = bytearray(blob)
    flipped[-1] ^= 1
    assert unpack(bytes(flipped)) is None
    assert unpack(blob[:-1]) is None
    assert unpack(b"") is None


def test_memory_tier_evicts_least_recently_used() -> None:
    tier = MemoryTier(budget_bytes=300)
    for n in range(3):
        assert tier.put(key(n), Entry(n, bytes(100)))
    assert tier.get(key(0)) is not None  # 0 is now the most recent
    tier.put(key(3), Entry(3, bytes(100)))
    assert tier.contains(key(0))
    assert not tier.contains(key(1))
    assert tier.usage() == (3, 300, 300)
    assert not tier.put(key(9), Entry(9, bytes(301)))


def test_disk_tier_survives_a_restart_and_keeps_its_budget(tmp_path: Path) -> None:
    entry_size = len(pack(Entry(1, bytes(1000))))
    tier = DiskTier(tmp_path, budget_bytes=entry_size * 2)
    tier.put(key(1), Entry(1, bytes(1000)))
    tier.put(key(2), Entry(2, b"x" * 1000))
    tier.put(key(3), Entry(3, b"y" * 1000))
    assert not tier.contains(key(1))
    reopened = DiskTier(tmp_path, budget_bytes=entry_size * 2)
    assert reopened.get(key(3)) == Entry(3, b"y" * 1000)
    assert reopened.get(key(2)) == Entry(2, b"x" * 1000)
    assert reopened.get(key(1)) is None
    assert reopened.usage() == (2, entry_size * 2, entry_size * 2)


def test_a_corrupt_or_truncated_file_is_a_miss_and_is_dropped(tmp_path: Path) -> None:
    tier = DiskTier(tmp_path, budget_bytes=1 << 20)
    tier.put(key(1), Entry(1, b"a" * 500))
    tier.put(key(2), Entry(2, b"b" * 500))
    path1 = tmp_path / f"{key(1).name}.kv"
    data = bytearray(path1.read_bytes())
    data[-10] ^= 0xFF
    path1.write_bytes(bytes(data))
    path2 = tmp_path / f"{key(2).name}.kv"
    path2.write_bytes(path2.read_bytes()[:100])
    store = KVStore([MemoryTier(1 << 20), DiskTier(tmp_path, 1 << 20)])
    assert store.get(key(1)) is None
    assert store.get(key(2)) is None
    assert not path1.exists()
    assert not path2.exists()
    assert store.lookup("fp", ["h1", "h2"]) == 0


def test_store_promotes_hits_and_finds_the_longest_prefix(tmp_path: Path) -> None:
    memory = MemoryTier(1 << 20)
    store = KVStore([memory, DiskTier(tmp_path, 1 << 20)])
    store.put(key(2), Entry(128, b"two"))
    store.put(key(4), Entry(256, b"four"))
    assert store.lookup("fp", ["h1", "h2", "h3", "h4", "h5"]) == 4
    assert store.lookup("fp", ["h1", "h2", "h3"]) == 2
    assert store.lookup("other-model", ["h1", "h2", "h3", "h4"]) == 0
    memory.delete(key(4))
    found = store.get(key(4))
    assert found == (Entry(256, b"four"), "disk")
    assert store.get(key(4)) == (Entry(256, b"four"), "memory")
    assert store.delete(key(4))
    assert not store.delete(key(4))
    stats = {s.name: s for s in store.stats()}
    assert stats["memory"].hits == 1
    assert stats["disk"].hits == 1
    assert stats["memory"].misses == 1


def test_config_selects_the_mooncake_tier_last(tmp_path: Path) -> None:
    fake = FakeMooncakeStore()
    seen: list[MooncakeConfig] = []

    def factory(config: MooncakeConfig) -> FakeMooncakeStore:
        seen.append(config)
        return fake

    config = KVCacheConfig(
        memory_mb=1,
        disk_dir=tmp_path,
        disk_mb=1,
        backend="mooncake",
        mooncake=MooncakeConfig(master_server_address="mc:50051"),
    )
    store = build_store(config, factory)
    assert [t.name for t in store.tiers] == ["memory", "disk", "mooncake"]
    assert seen[0].master_server_address == "mc:50051"
    store.put(key(1), Entry(64, b"shared"))
    assert fake.objects
    # Another kv-cache replica with only the shared Mooncake tier finds it.
    other = KVStore([MooncakeTier(fake)])
    assert other.lookup("fp", ["h1"]) == 1
    assert other.get(key(1)) == (Entry(64, b"shared"), "mooncake")
    assert [t.name for t in build_store(KVCacheConfig(disk_mb=0), factory).tiers] == ["memory"]
    assert len(seen) == 1


def test_mooncake_without_the_package_is_a_clear_error() -> None:
    with pytest.raises(FailedPrecondition, match="service-slm\\[mooncake\\]"):
        connect_mooncake(MooncakeConfig())
