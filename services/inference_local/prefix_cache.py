"""Prefix caching for inference-local: block hashing, this process's memory of prefix states,
and the kv-cache service behind it.

A prompt is cut into blocks of `block_tokens`; block i's hash covers block i-1's hash and
block i's tokens, so one hash names a whole prefix. A state is a llama.cpp sequence state
snapshotted exactly at a block boundary and restored whole, never truncated: with Gemma 3's
sliding-window layers a truncated state would lack window cells, while a whole one is exact
(so the context keeps its small SWA cache, swa_full stays off).

Which boundaries are snapshotted: the last one of each prompt; one block before it when nothing
of the prompt was known (a short question after a shared document); and the longest prefix
this process has already seen in an earlier prompt (where conversations and documents branch),
so the second request that shares a prefix with the first leaves a state for every later one.
"""

from __future__ import annotations

import array
import asyncio
import collections
import hashlib
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import llama_cpp
from prometheus_client import CollectorRegistry, Counter, Histogram

from slm.errors import from_rpc_error
from slm.v1 import kvcache_pb2, kvcache_pb2_grpc

log = logging.getLogger(__name__)

_FINGERPRINT_HEAD = 4 << 20
_CHUNK = 1 << 20
_SEEN_LIMIT = 65536


def block_hashes(tokens: Sequence[int], block_tokens: int) -> list[str]:
    """Chained hashes of every full block of `tokens`."""
    hashes: list[str] = []
    previous = b""
    for start in range(0, len(tokens) - block_tokens + 1, block_tokens):
        digest = hashlib.sha256(previous)
        digest.update(array.array("i", tokens[start : start + block_tokens]).tobytes())
        previous = digest.digest()
        hashes.append(previous.hex())
    return hashes


def file_fingerprint(path: Path) -> str:
    """Size and the first MBs of a weights or adapter file: what identifies its contents
    (the GGUF header holds the quantization and tensor layout) without reading gigabytes."""
    digest = hashlib.sha256()
    size = path.stat().st_size
    digest.update(f"{path.name}\0{size}\0".encode())
    with open(path, "rb") as f:
        digest.update(f.read(_FINGERPRINT_HEAD))
    return digest.hexdigest()


@dataclass(frozen=True)
class Restore:
    n_tokens: int
    state: bytes
    tier: str


@dataclass(eq=False)
class PrefixPlan:
    """What the scheduler does for one request: restore a prefix, snapshot at `save_at`."""

    cache: PrefixCache
    model: str
    fingerprint: str
    hashes: list[str]
    restore: Restore | None
    save_at: tuple[int, ...]
    saved: list[int] = field(default_factory=list)

    def next_save(self, position: int) -> int | None:
        """The first snapshot position after `position`."""
        for point in self.save_at:
            if point > position:
                return point
        return None

    def wants(self, position: int) -> bool:
        return position in self.save_at and position not in self.saved

    def refused(self) -> None:
        """llama.cpp refused the restored state (another build wrote it, or it is damaged):
        the sequence prefills from the start and snapshots there to replace it."""
        if self.restore is not None:
            self.save_at = tuple(sorted({*self.save_at, self.restore.n_tokens}))

    def store(self, position: int, state: bytes, copy_seconds: float) -> None:
        """Called on the decode thread with the copied state; the rest happens elsewhere."""
        self.saved.append(position)
        self.cache.offer(self, position, state, copy_seconds)


class PrefixCacheMetrics:
    """Token counts follow vLLM's prefix-cache metrics (hits / queries is the hit rate the
    chart's dashboard draws)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "slm_engine_prefix_cache_requests",
            "Generations by where their prefix state came from (memory, service) or miss.",
            ["model", "tier"],
            registry=registry,
        )
        self.hits = Counter(
            "slm_engine_prefix_cache_hits",
            "Prompt tokens restored instead of prefilled (prefill tokens saved), by tier.",
            ["model", "tier"],
            registry=registry,
        )
        self.queries = Counter(
            "slm_engine_prefix_cache_queries",
            "Prompt tokens looked up in the prefix cache.",
            ["model"],
            registry=registry,
        )
        self.bytes_restored = Counter(
            "slm_engine_prefix_cache_restored_bytes",
            "State bytes restored, by tier.",
            ["model", "tier"],
            registry=registry,
        )
        self.bytes_stored = Counter(
            "slm_engine_prefix_cache_stored_bytes",
            "State bytes snapshotted, by destination (memory, service).",
            ["model", "tier"],
            registry=registry,
        )
        self.copy_seconds = Histogram(
            "slm_engine_prefix_cache_state_copy_seconds",
            "Time the decode thread spends copying a sequence state out.",
            ["model"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25),
            registry=registry,
        )


class KVCacheClient:
    """KVCacheService over gRPC; failures are logged and treated as misses by the caller."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._channel = channel
        self._stub = kvcache_pb2_grpc.KVCacheServiceStub(channel)

    async def lookup(self, fingerprint: str, hashes: Sequence[str]) -> int:
        try:
            reply = await self._stub.Lookup(
                kvcache_pb2.LookupRequest(fingerprint=fingerprint, block_hashes=hashes), timeout=5
            )
        except grpc.aio.AioRpcError as error:
            raise from_rpc_error(error) from None
        return int(reply.n_blocks)

    async def get(self, fingerprint: str, block_hash: str) -> bytes | None:
        key = kvcache_pb2.CacheKey(fingerprint=fingerprint, block_hash=block_hash)
        parts: list[bytes] = []
        expected = ""
        try:
            async for reply in self._stub.Get(kvcache_pb2.GetRequest(key=key), timeout=60):
                if not parts and reply.sha256:
                    expected = reply.sha256
                parts.append(reply.chunk)
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise from_rpc_error(error) from None
        data = b"".join(parts)
        if hashlib.sha256(data).hexdigest() != expected:
            log.warning("kv-cache entry failed its checksum in transit")
            return None
        return data

    async def put(self, fingerprint: str, block_hash: str, n_tokens: int, data: bytes) -> None:
        key = kvcache_pb2.CacheKey(
            fingerprint=fingerprint, block_hash=block_hash, n_tokens=n_tokens
        )

        async def chunks() -> collections.abc.AsyncIterator[kvcache_pb2.PutRequest]:
            yield kvcache_pb2.PutRequest(key=key, total_bytes=len(data), chunk=data[:_CHUNK])
            for start in range(_CHUNK, len(data), _CHUNK):
                yield kvcache_pb2.PutRequest(chunk=data[start : start + _CHUNK])

        try:
            await self._stub.Put(chunks(), timeout=60)
        except grpc.aio.AioRpcError as error:
            raise from_rpc_error(error) from None

    async def close(self) -> None:
        # Whoever made the channel closes it (the process's Connector, or a test).
        pass


class PrefixCache:
    """This process's prefix states (LRU under a byte budget), then the kv-cache service."""

    def __init__(
        self,
        block_tokens: int,
        memory_bytes: int,
        client: KVCacheClient | None,
        metrics: PrefixCacheMetrics,
    ) -> None:
        self.block_tokens = block_tokens
        self._budget = memory_bytes
        self._client = client
        self._metrics = metrics
        self._lock = threading.Lock()  # the decode threads offer, the event loop plans
        self._states: collections.OrderedDict[tuple[str, str], bytes] = collections.OrderedDict()
        self._bytes = 0
        self._seen: collections.OrderedDict[tuple[str, str], None] = collections.OrderedDict()
        self._files: dict[Path, str] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None

    async def fingerprint(self, model: Path, adapters: Sequence[tuple[Path, float]]) -> str:
        """Weights file, adapter files and scales, and the llama.cpp version (the state
        format is its own)."""
        parts = [f"llama.cpp {llama_cpp.__version__}", await self._file(model)]
        for path, scale in adapters:
            parts.append(f"{await self._file(path)}@{scale!r}")
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()

    async def _file(self, path: Path) -> str:
        # Once per file per process: model files and registry artefacts are not rewritten in
        # place (the registry is content-addressed).
        known = self._files.get(path)
        if known is None:
            known = self._files[path] = await asyncio.to_thread(file_fingerprint, path)
        return known

    async def plan(self, model: str, fingerprint: str, prompt: Sequence[int]) -> PrefixPlan:
        """Find the longest restorable prefix (memory, then the service) and where to
        snapshot. At least the prompt's last token is always left to prefill."""
        self._loop = asyncio.get_running_loop()
        hashes = block_hashes(prompt[: len(prompt) - 1], self.block_tokens)
        restore: Restore | None = None
        with self._lock:
            for n in range(len(hashes), 0, -1):
                state = self._states.get((fingerprint, hashes[n - 1]))
                if state is not None:
                    self._states.move_to_end((fingerprint, hashes[n - 1]))
                    restore = Restore(n * self.block_tokens, state, "memory")
                    break
        local_blocks = restore.n_tokens // self.block_tokens if restore else 0
        remote_blocks = 0
        if self._client is not None and len(hashes) > local_blocks:
            try:
                remote_blocks = await self._client.lookup(fingerprint, hashes)
                if remote_blocks > local_blocks:
                    state = await self._client.get(fingerprint, hashes[remote_blocks - 1])
                    if state is not None:
                        restore = Restore(remote_blocks * self.block_tokens, state, "service")
            except Exception:  # the cache is an optimisation: an outage is a miss
                log.warning("kv-cache service unavailable", exc_info=True)
        restored_blocks = restore.n_tokens // self.block_tokens if restore else 0
        self._metrics.queries.labels(model).inc(len(prompt))
        if restore is None:
            self._metrics.requests.labels(model, "miss").inc()
        else:
            self._metrics.requests.labels(model, restore.tier).inc()
            self._metrics.hits.labels(model, restore.tier).inc(restore.n_tokens)
            self._metrics.bytes_restored.labels(model, restore.tier).inc(len(restore.state))
        known = max(restored_blocks, remote_blocks)
        save: set[int] = set()
        with self._lock:
            branch = 0
            for n in range(len(hashes), 0, -1):
                if (fingerprint, hashes[n - 1]) in self._seen:
                    branch = n
                    break
            for h in hashes:
                self._seen[(fingerprint, h)] = None
                self._seen.move_to_end((fingerprint, h))
            while len(self._seen) > _SEEN_LIMIT:
                self._seen.popitem(last=False)
            # A prompt sharing nothing known yet also snapshots one block before its last
            # boundary: a short question after a long document usually starts in that block.
            guess = len(hashes) - 1 if restore is None and not branch else 0
            for n in (branch, guess, len(hashes)):
                if n > known and (fingerprint, hashes[n - 1]) not in self._states:
                    save.add(n * self.block_tokens)
        return PrefixPlan(self, model, fingerprint, hashes, restore, tuple(sorted(save)))

    def offer(self, plan: PrefixPlan, position: int, state: bytes, copy_seconds: float) -> None:
        """Keep a snapshot (decode thread): into memory now, to the service on the loop."""
        block_hash = plan.hashes[position // self.block_tokens - 1]
        self._metrics.copy_seconds.labels(plan.model).observe(copy_seconds)
        with self._lock:
            if self._budget >= len(state):
                key = (plan.fingerprint, block_hash)
                old = self._states.pop(key, None)
                self._bytes -= len(old) if old is not None else 0
                self._states[key] = state
                self._bytes += len(state)
                while self._bytes > self._budget:
                    _, dropped = self._states.popitem(last=False)
                    self._bytes -= len(dropped)
                self._metrics.bytes_stored.labels(plan.model, "memory").inc(len(state))
        if self._client is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(
                self._spawn, plan.model, plan.fingerprint, block_hash, position, state
            )

    def _spawn(self, model: str, fingerprint: str, block_hash: str, n: int, state: bytes) -> None:
        task = asyncio.get_running_loop().create_task(
            self._put(model, fingerprint, block_hash, n, state)
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _put(
        self, model: str, fingerprint: str, block_hash: str, n: int, state: bytes
    ) -> None:
        assert self._client is not None
        try:
            await self._client.put(fingerprint, block_hash, n, state)
            self._metrics.bytes_stored.labels(model, "service").inc(len(state))
        except Exception:
            log.warning("storing a prefix state in the kv-cache service failed", exc_info=True)

    async def flush(self) -> None:
        """Wait for background stores (tests, shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def close(self) -> None:
        await self.flush()
        if self._client is not None:
            await self._client.close()
