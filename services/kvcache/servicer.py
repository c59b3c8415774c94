"""KVCacheService over gRPC: converts protobuf to the store's plain types and back."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge

from kvcache.store import Entry, Key, KVStore
from slm.errors import InvalidArgument, NotFound, ResourceExhausted, SlmError, to_grpc_status
from slm.v1 import kvcache_pb2, kvcache_pb2_grpc

CHUNK = 1 << 20


class KVCacheMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.lookups = Counter(
            "slm_kvcache_lookups",
            "Lookups, by result (hit, miss).",
            ["result"],
            registry=registry,
        )
        self.gets = Counter(
            "slm_kvcache_gets",
            "Gets, by the tier that served them or miss.",
            ["tier"],
            registry=registry,
        )
        self.bytes_in = Counter("slm_kvcache_put_bytes", "Bytes stored.", registry=registry)
        self.bytes_out = Counter("slm_kvcache_get_bytes", "Bytes served.", registry=registry)
        self.tier_bytes = Gauge(
            "slm_kvcache_tier_bytes", "Bytes held, by tier.", ["tier"], registry=registry
        )

    def usage(self, store: KVStore) -> None:
        for tier in store.stats():
            self.tier_bytes.labels(tier.name).set(tier.bytes)


def _key(message: kvcache_pb2.CacheKey, field: str) -> Key:
    if not message.fingerprint:
        raise InvalidArgument("fingerprint must not be empty", field=f"{field}.fingerprint")
    if not message.block_hash:
        raise InvalidArgument("block_hash must not be empty", field=f"{field}.block_hash")
    return Key(message.fingerprint, message.block_hash)


class KVCacheServicer(kvcache_pb2_grpc.KVCacheServiceServicer):
    def __init__(self, store: KVStore, metrics: KVCacheMetrics, max_entry_bytes: int) -> None:
        self._store = store
        self._metrics = metrics
        self._max = max_entry_bytes

    async def Put(
        self,
        request_iterator: AsyncIterator[kvcache_pb2.PutRequest],
        context: grpc.aio.ServicerContext[kvcache_pb2.PutRequest, kvcache_pb2.PutResponse],
    ) -> kvcache_pb2.PutResponse:
        # The mesh's ErrorInterceptor maps unary and server-streaming handlers; this is the
        # only client-streaming one, so it maps its own errors the same way.
        try:
            return await self._put(request_iterator)
        except SlmError as error:
            status = to_grpc_status(error)
            await context.abort(status.code, status.details, status.trailing_metadata)
            raise  # abort raises; this keeps the type checker informed

    async def _put(
        self, request_iterator: AsyncIterator[kvcache_pb2.PutRequest]
    ) -> kvcache_pb2.PutResponse:
        key: Key | None = None
        n_tokens = total = 0
        parts: list[bytes] = []
        received = 0
        async for message in request_iterator:
            if key is None:
                if not message.HasField("key"):
                    raise InvalidArgument("the first message must carry the key", field="key")
                key = _key(message.key, "key")
                n_tokens, total = message.key.n_tokens, message.total_bytes
                if total > self._max:
                    raise ResourceExhausted(
                        f"entry of {total} bytes exceeds the limit of {self._max} bytes"
                    )
            elif message.HasField("key"):
                raise InvalidArgument("only the first message may carry the key", field="key")
            received += len(message.chunk)
            if received > total:
                raise InvalidArgument(f"chunks exceed total_bytes ({total})", field="total_bytes")
            parts.append(message.chunk)
        if key is None:
            raise InvalidArgument("empty stream: no key", field="key")
        if received != total:
            raise InvalidArgument(
                f"received {received} bytes, total_bytes says {total}", field="total_bytes"
            )
        data = b"".join(parts)
        stored = await asyncio.to_thread(self._store.put, key, Entry(n_tokens, data))
        if not stored:
            raise ResourceExhausted(f"entry of {total} bytes is larger than every tier's budget")
        self._metrics.bytes_in.inc(total)
        self._metrics.usage(self._store)
        return kvcache_pb2.PutResponse(sha256=hashlib.sha256(data).hexdigest())

    async def Get(
        self,
        request: kvcache_pb2.GetRequest,
        context: grpc.aio.ServicerContext[kvcache_pb2.GetRequest, kvcache_pb2.GetResponse],
    ) -> AsyncIterator[kvcache_pb2.GetResponse]:
        key = _key(request.key, "key")
        found = await asyncio.to_thread(self._store.get, key)
        if found is None:
            self._metrics.gets.labels("miss").inc()
            raise NotFound("no such kv-cache entry", field="key")
        entry, tier = found
        self._metrics.gets.labels(tier).inc()
        self._metrics.bytes_out.inc(len(entry.data))
        data = entry.data
        yield kvcache_pb2.GetResponse(
            total_bytes=len(data),
            sha256=hashlib.sha256(data).hexdigest(),
            tier=tier,
            chunk=data[:CHUNK],
        )
        for start in range(CHUNK, len(data), CHUNK):
            yield kvcache_pb2.GetResponse(chunk=data[start : start + CHUNK])

    async def Lookup(
        self,
        request: kvcache_pb2.LookupRequest,
        context: grpc.aio.ServicerContext[kvcache_pb2.LookupRequest, kvcache_pb2.LookupResponse],
    ) -> kvcache_pb2.LookupResponse:
        if not request.fingerprint:
            raise InvalidArgument("fingerprint must not be empty", field="fingerprint")
        hashes = list(request.block_hashes)
        n = await asyncio.to_thread(self._store.lookup, request.fingerprint, hashes)
        self._metrics.lookups.labels("hit" if n else "miss").inc()
        if not n:
            return kvcache_pb2.LookupResponse()
        return kvcache_pb2.LookupResponse(
            n_blocks=n,
            key=kvcache_pb2.CacheKey(fingerprint=request.fingerprint, block_hash=hashes[n - 1]),
        )

    async def Delete(
        self,
        request: kvcache_pb2.DeleteRequest,
        context: grpc.aio.ServicerContext[kvcache_pb2.DeleteRequest, kvcache_pb2.DeleteResponse],
    ) -> kvcache_pb2.DeleteResponse:
        key = _key(request.key, "key")
        if not await asyncio.to_thread(self._store.delete, key):
            raise NotFound("no such kv-cache entry", field="key")
        self._metrics.usage(self._store)
        return kvcache_pb2.DeleteResponse()

    async def Stats(
        self,
        request: kvcache_pb2.StatsRequest,
        context: grpc.aio.ServicerContext[kvcache_pb2.StatsRequest, kvcache_pb2.StatsResponse],
    ) -> kvcache_pb2.StatsResponse:
        stats = await asyncio.to_thread(self._store.stats)
        return kvcache_pb2.StatsResponse(
            tiers=[
                kvcache_pb2.TierStats(
                    name=t.name,
                    entries=t.entries,
                    bytes=t.bytes,
                    budget_bytes=t.budget_bytes,
                    hits=t.hits,
                    misses=t.misses,
                )
                for t in stats
            ]
        )
