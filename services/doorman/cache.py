"""The Doorman's result cache: whole answers of deterministic requests, replayed as streams.

An entry is the upstream's events of one complete answer (deltas, tool calls, the end with
usage), exactly as the upstream sent them: in placeholder form where the route sanitised, so no
raw personal data is kept that the upstream did not see. Its key is a SHA-256 over the tenant
and the deterministic serialisation of the request the upstream was sent (sanitised or not), so
tenants never share an entry and every sampling, tool and constraint field is part of the key.
"""

from __future__ import annotations

import hashlib
import struct
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from google.protobuf.message import DecodeError

from slm.errors import Unavailable
from slm.v1 import inference_pb2, types_pb2

# Answers that ended on their own; an error, a cancellation or a content filter is never kept.
CACHEABLE_FINISH = frozenset(
    {
        types_pb2.FINISH_REASON_STOP,
        types_pb2.FINISH_REASON_LENGTH,
        types_pb2.FINISH_REASON_TOOL_CALLS,
    }
)

# Changes whenever the key material or the entry format does, so old entries are never read.
_KEY_VERSION = b"slm.result-cache.v1\0"
_FORMAT = b"\x01"
_FRAME = struct.Struct(">I")


def deterministic(sampling: types_pb2.SamplingParams) -> bool:
    """Whether the same request gives the same answer: greedy decoding, or a fixed seed."""
    if sampling.HasField("seed"):
        return True
    return sampling.HasField("temperature") and sampling.temperature == 0


def cache_key(tenant: str, request: inference_pb2.GenerateRequest) -> str:
    """The entry's key: the tenant, then every field of the request the upstream is sent."""
    digest = hashlib.sha256(_KEY_VERSION)
    name = tenant.encode()
    # Length-prefixed, so no tenant name can run into the request's bytes.
    digest.update(_FRAME.pack(len(name)) + name)
    digest.update(request.SerializeToString(deterministic=True))
    return digest.hexdigest()


def cacheable(end: types_pb2.StreamEnd) -> bool:
    """Whether an answer that ended so is complete: every choice stopped on its own."""
    if end.finish_reason not in CACHEABLE_FINISH:
        return False
    return all(choice.finish_reason in CACHEABLE_FINISH for choice in end.choices)


def encode(events: Sequence[bytes]) -> bytes:
    """Serialised GenerateResponse events as one entry: a format byte, then length-prefixed."""
    return _FORMAT + b"".join(_FRAME.pack(len(event)) + event for event in events)


def decode(data: bytes) -> list[inference_pb2.GenerateResponse] | None:
    """The events of an entry, fresh messages each time; None for an entry it cannot read."""
    if not data.startswith(_FORMAT):
        return None
    events: list[inference_pb2.GenerateResponse] = []
    position = len(_FORMAT)
    try:
        while position < len(data):
            (size,) = _FRAME.unpack_from(data, position)
            position += _FRAME.size
            if position + size > len(data):
                return None
            event = inference_pb2.GenerateResponse()
            event.ParseFromString(data[position : position + size])
            position += size
            events.append(event)
    except (struct.error, DecodeError):
        return None
    if not events or not events[-1].HasField("end"):
        return None
    return events


class ResultStore(Protocol):
    """Where entries live; storage faults are raised as slm.errors.Unavailable."""

    async def get(self, key: str) -> bytes | None: ...

    async def put(self, key: str, data: bytes) -> None: ...

    async def close(self) -> None: ...


class MemoryResults:
    """Entries in this process, least recently used first out: the embedded default."""

    def __init__(
        self,
        ttl_s: float,
        max_entries: int,
        max_bytes: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._ttl_s = ttl_s
        self._max_entries = max_entries
        self._max_bytes = max_bytes
        self._clock = clock
        self._entries: OrderedDict[str, tuple[float, bytes]] = OrderedDict()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def size_bytes(self) -> int:
        return self._bytes

    async def get(self, key: str) -> bytes | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        expires, data = entry
        if self._clock() >= expires:
            self._drop(key)
            return None
        self._entries.move_to_end(key)
        return data

    async def put(self, key: str, data: bytes) -> None:
        if len(data) > self._max_bytes:
            return
        if key in self._entries:
            self._drop(key)
        self._entries[key] = (self._clock() + self._ttl_s, data)
        self._bytes += len(data)
        while len(self._entries) > self._max_entries or self._bytes > self._max_bytes:
            oldest = next(iter(self._entries))
            self._drop(oldest)

    def _drop(self, key: str) -> None:
        _, data = self._entries.pop(key)
        self._bytes -= len(data)

    async def close(self) -> None:
        self._entries.clear()
        self._bytes = 0


class RedisResults:
    """Entries in Redis, shared by every Doorman replica; Redis expires them after the TTL and
    its maxmemory policy bounds their size."""

    def __init__(
        self, url: str, ttl_s: float, prefix: str = "slm:result:", timeout_s: float = 1.0
    ) -> None:
        import redis.asyncio as redis

        # The cache is skipped when Redis fails; a Redis that hangs must fail, not hold requests.
        self._client: Any = redis.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s
        )
        self._ttl_ms = max(1, int(ttl_s * 1000))
        self._prefix = prefix

    async def get(self, key: str) -> bytes | None:
        import redis.exceptions

        try:
            data: bytes | None = await self._client.get(self._prefix + key)
        except redis.exceptions.RedisError as error:
            raise Unavailable("the result cache is unavailable", reason="CACHE_UNAVAILABLE") from (
                error
            )
        return data

    async def put(self, key: str, data: bytes) -> None:
        import redis.exceptions

        try:
            await self._client.set(self._prefix + key, data, px=self._ttl_ms)
        except redis.exceptions.RedisError as error:
            raise Unavailable("the result cache is unavailable", reason="CACHE_UNAVAILABLE") from (
                error
            )

    async def close(self) -> None:
        await self._client.aclose()


class ResultCache:
    """Answers by key over a store; entries larger than `max_entry_bytes` are not kept."""

    def __init__(self, store: ResultStore, max_entry_bytes: int) -> None:
        self.store = store
        self.max_entry_bytes = max_entry_bytes

    async def get(
        self, keys: Sequence[str]
    ) -> tuple[str, list[inference_pb2.GenerateResponse]] | None:
        """The first of `keys` that holds a readable answer, with that answer's events."""
        for key in keys:
            data = await self.store.get(key)
            if data is None:
                continue
            events = decode(data)
            if events is not None:
                return key, events
        return None

    async def put(self, key: str, events: Sequence[bytes]) -> bool:
        """Keep a complete answer's serialised events; False when it is too large to keep."""
        data = encode(events)
        if len(data) > self.max_entry_bytes:
            return False
        await self.store.put(key, data)
        return True

    async def close(self) -> None:
        await self.store.close()
