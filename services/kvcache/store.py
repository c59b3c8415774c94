"""The kv-cache core: content-addressed prefix states in tiers (memory, disk, Mooncake)."""

from __future__ import annotations

import collections
import hashlib
import logging
import os
import struct
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

log = logging.getLogger(__name__)

# Disk and Mooncake entries: magic, n_tokens, payload length, SHA-256 of the payload.
_HEADER = struct.Struct("<8sIQ32s")
_MAGIC = b"SLMKV001"


@dataclass(frozen=True)
class Key:
    """(model fingerprint, hash of the last block of the prefix's chain)."""

    fingerprint: str
    block_hash: str

    @property
    def name(self) -> str:
        """A flat, filesystem- and Mooncake-safe name."""
        return hashlib.sha256(f"{self.fingerprint}/{self.block_hash}".encode()).hexdigest()


@dataclass(frozen=True)
class Entry:
    n_tokens: int
    data: bytes


@dataclass(frozen=True)
class TierStats:
    name: str
    entries: int
    bytes: int
    budget_bytes: int
    hits: int
    misses: int


def pack(entry: Entry) -> bytes:
    digest = hashlib.sha256(entry.data).digest()
    return _HEADER.pack(_MAGIC, entry.n_tokens, len(entry.data), digest) + entry.data


def unpack(blob: bytes) -> Entry | None:
    """The entry, or None when the blob is truncated or fails its checksum."""
    if len(blob) < _HEADER.size:
        return None
    magic, n_tokens, length, digest = _HEADER.unpack_from(blob)
    data = blob[_HEADER.size :]
    if magic != _MAGIC or len(data) != length or hashlib.sha256(data).digest() != digest:
        return None
    return Entry(n_tokens, data)


class Tier(Protocol):
    """One storage level; implementations are called with the store's lock held."""

    name: str

    def get(self, key: Key) -> Entry | None: ...

    def put(self, key: Key, entry: Entry) -> bool: ...

    def contains(self, key: Key) -> bool: ...

    def delete(self, key: Key) -> bool: ...

    def usage(self) -> tuple[int, int, int]:
        """(entries, bytes, budget bytes)."""
        ...


class MemoryTier:
    """Entries in process memory, least recently used evicted beyond the byte budget."""

    name = "memory"

    def __init__(self, budget_bytes: int) -> None:
        self.budget = budget_bytes
        self._entries: collections.OrderedDict[Key, Entry] = collections.OrderedDict()
        self._bytes = 0

    def get(self, key: Key) -> Entry | None:
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
        return entry

    def put(self, key: Key, entry: Entry) -> bool:
        if len(entry.data) > self.budget:
            return False
        self.delete(key)
        self._entries[key] = entry
        self._bytes += len(entry.data)
        while self._bytes > self.budget:
            _, old = self._entries.popitem(last=False)
            self._bytes -= len(old.data)
        return True

    def contains(self, key: Key) -> bool:
        return key in self._entries

    def delete(self, key: Key) -> bool:
        old = self._entries.pop(key, None)
        if old is None:
            return False
        self._bytes -= len(old.data)
        return True

    def usage(self) -> tuple[int, int, int]:
        return len(self._entries), self._bytes, self.budget


class DiskTier:
    """One checksummed file per entry under `root`; survives restarts. A file that fails its
    checksum is deleted and reported as a miss."""

    name = "disk"

    def __init__(self, root: Path, budget_bytes: int) -> None:
        self.root = root
        self.budget = budget_bytes
        root.mkdir(parents=True, exist_ok=True)
        # name -> size, oldest use first; rebuilt from the files (mtime is the last use).
        self._files: collections.OrderedDict[str, int] = collections.OrderedDict()
        found = []
        for path in root.glob("*.kv"):
            try:
                stat = path.stat()
            except OSError:
                continue
            found.append((stat.st_mtime, path.stem, stat.st_size))
        for _, name, size in sorted(found):
            self._files[name] = size
        self._bytes = sum(self._files.values())
        for partial in root.glob("*.partial"):
            partial.unlink(missing_ok=True)
        self._evict()

    def _path(self, name: str) -> Path:
        return self.root / f"{name}.kv"

    def get(self, key: Key) -> Entry | None:
        name = key.name
        if name not in self._files:
            return None
        path = self._path(name)
        try:
            blob = path.read_bytes()
        except OSError:
            self._forget(name)
            return None
        entry = unpack(blob)
        if entry is None:
            log.warning("corrupt kv-cache file dropped", extra={"path": str(path)})
            self._drop(name)
            return None
        os.utime(path)
        self._files.move_to_end(name)
        return entry

    def put(self, key: Key, entry: Entry) -> bool:
        blob = pack(entry)
        if len(blob) > self.budget:
            return False
        name = key.name
        partial = self.root / f"{name}.partial"
        with open(partial, "wb") as f:
            f.write(blob)
        partial.replace(self._path(name))
        self._forget(name)
        self._files[name] = len(blob)
        self._bytes += len(blob)
        self._evict()
        return True

    def contains(self, key: Key) -> bool:
        return key.name in self._files

    def delete(self, key: Key) -> bool:
        if key.name not in self._files:
            return False
        self._drop(key.name)
        return True

    def usage(self) -> tuple[int, int, int]:
        return len(self._files), self._bytes, self.budget

    def _forget(self, name: str) -> None:
        size = self._files.pop(name, None)
        if size is not None:
            self._bytes -= size

    def _drop(self, name: str) -> None:
        self._forget(name)
        self._path(name).unlink(missing_ok=True)

    def _evict(self) -> None:
        while self._bytes > self.budget and self._files:
            self._drop(next(iter(self._files)))


class ObjectStore(Protocol):
    """The part of Mooncake's store client the Mooncake tier uses."""

    def put(self, key: str, value: bytes) -> int: ...

    def get(self, key: str) -> bytes: ...

    def is_exist(self, key: str) -> int: ...

    def remove(self, key: str) -> int: ...


class MooncakeTier:
    """Entries in a Mooncake distributed store, shared by every kv-cache replica using it.
    Its budget is the Mooncake cluster's own; entries carry the same checksummed header."""

    name = "mooncake"

    def __init__(self, store: ObjectStore) -> None:
        self._store = store

    def get(self, key: Key) -> Entry | None:
        blob = self._store.get(key.name)
        return unpack(blob) if blob else None

    def put(self, key: Key, entry: Entry) -> bool:
        return self._store.put(key.name, pack(entry)) == 0

    def contains(self, key: Key) -> bool:
        return self._store.is_exist(key.name) == 1

    def delete(self, key: Key) -> bool:
        return self._store.remove(key.name) == 0

    def usage(self) -> tuple[int, int, int]:
        return 0, 0, 0


class KVStore:
    """Tiers searched in order; a hit is copied into the tiers above it, a put goes to all
    (write-through, so the disk copy outlives the process). Thread-safe."""

    def __init__(self, tiers: Sequence[Tier]) -> None:
        self.tiers = list(tiers)
        self._lock = threading.Lock()
        self._hits = {t.name: 0 for t in self.tiers}
        self._misses = {t.name: 0 for t in self.tiers}

    def get(self, key: Key) -> tuple[Entry, str] | None:
        with self._lock:
            for i, tier in enumerate(self.tiers):
                entry = tier.get(key)
                if entry is None:
                    self._misses[tier.name] += 1
                    continue
                self._hits[tier.name] += 1
                for upper in self.tiers[:i]:
                    upper.put(key, entry)
                return entry, tier.name
            return None

    def put(self, key: Key, entry: Entry) -> bool:
        """False when no tier could take it (larger than every budget)."""
        with self._lock:
            stored = [tier.put(key, entry) for tier in self.tiers]
            return any(stored)

    def lookup(self, fingerprint: str, block_hashes: Sequence[str]) -> int:
        """How many leading blocks end at a stored entry (the longest such prefix)."""
        with self._lock:
            for n in range(len(block_hashes), 0, -1):
                key = Key(fingerprint, block_hashes[n - 1])
                if any(tier.contains(key) for tier in self.tiers):
                    return n
            return 0

    def delete(self, key: Key) -> bool:
        with self._lock:
            deleted = [tier.delete(key) for tier in self.tiers]
            return any(deleted)

    def stats(self) -> list[TierStats]:
        with self._lock:
            return [
                TierStats(t.name, *t.usage(), self._hits[t.name], self._misses[t.name])
                for t in self.tiers
            ]
