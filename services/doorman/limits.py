"""Admission: per-tenant RPM/TPM token buckets and concurrency, and a priority queue per tier."""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

from doorman.auth import Tenant
from slm.errors import ResourceExhausted, Unavailable

# "Charge whatever is there": token usage is known only after the answer, so it may go into debt.
NO_REQUIREMENT = -1e18


class RateLimited(ResourceExhausted):
    """A tenant's request or token rate is used up; RetryInfo says when it refills."""

    reason = "RATE_LIMITED"


class BucketStore(Protocol):
    async def acquire(
        self, key: str, rate_per_s: float, capacity: float, cost: float, require: float
    ) -> float:
        """Refill `key`, then take `cost` if at least `require` tokens are there.

        Returns 0 when taken, else the seconds until `require` tokens will be there.
        """

    async def close(self) -> None: ...


class MemoryBuckets:
    """Buckets in this process: the embedded default, one Doorman replica."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._state: dict[str, tuple[float, float]] = {}

    async def acquire(
        self, key: str, rate_per_s: float, capacity: float, cost: float, require: float
    ) -> float:
        now = self._clock()
        tokens, updated = self._state.get(key, (capacity, now))
        tokens = min(capacity, tokens + (now - updated) * rate_per_s)
        if tokens < require:
            self._state[key] = (tokens, now)
            return (require - tokens) / rate_per_s
        self._state[key] = (tokens - cost, now)
        return 0.0

    async def close(self) -> None:
        return None


# One round trip, atomic across replicas; Redis' own clock, so replicas need not agree on time.
_TOKEN_BUCKET_LUA = """
local rate = tonumber(ARGV[1])
local capacity = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local require = tonumber(ARGV[4])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(state[1]) or capacity
local ts = tonumber(state[2]) or now
tokens = math.min(capacity, tokens + math.max(0, now - ts) * rate)
local wait = 0
if tokens < require then
  wait = (require - tokens) / rate
else
  tokens = tokens - cost
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil((capacity - tokens) / rate * 1000) + 1000)
return tostring(wait)
"""


class RedisBuckets:
    """Buckets in Redis, so every Doorman replica shares one limit per tenant."""

    def __init__(self, url: str, prefix: str = "slm:ratelimit:") -> None:
        import redis.asyncio as redis

        self._client: Any = redis.Redis.from_url(url)
        self._script = self._client.register_script(_TOKEN_BUCKET_LUA)
        self._prefix = prefix

    async def acquire(
        self, key: str, rate_per_s: float, capacity: float, cost: float, require: float
    ) -> float:
        import redis.exceptions

        try:
            wait = await self._script(
                keys=[self._prefix + key], args=[rate_per_s, capacity, cost, require]
            )
        except redis.exceptions.RedisError as error:
            # Without its limit store the Doorman cannot tell who is over the limit.
            raise Unavailable(
                "the rate-limit store is unavailable", reason="LIMITS_UNAVAILABLE", retry_after_s=1
            ) from error
        return float(wait)

    async def close(self) -> None:
        await self._client.aclose()


class TenantLimiter:
    """RPM and TPM token buckets (RPM: one token a request; TPM: charged after the answer)."""

    def __init__(self, buckets: BucketStore) -> None:
        self._buckets = buckets
        self._running: Counter[str] = Counter()

    async def admit(self, tenant: Tenant) -> None:
        """Take a request slot, or raise RESOURCE_EXHAUSTED with the time to wait; release after."""
        if tenant.max_concurrent and self._running[tenant.name] >= tenant.max_concurrent:
            raise ResourceExhausted(
                f"tenant {tenant.name!r} has {tenant.max_concurrent} requests running already",
                reason="TOO_MANY_CONCURRENT",
                retry_after_s=1,
            )
        if tenant.rpm:
            wait = await self._buckets.acquire(
                f"rpm:{tenant.name}", tenant.rpm / 60, tenant.rpm, 1, 1
            )
            if wait > 0:
                raise RateLimited(
                    f"tenant {tenant.name!r} is over its limit of {tenant.rpm} requests per minute",
                    retry_after_s=wait,
                )
        if tenant.tpm:
            # Admit while any token is left; the answer's actual usage is charged afterwards.
            wait = await self._buckets.acquire(
                f"tpm:{tenant.name}", tenant.tpm / 60, tenant.tpm, 0, 1
            )
            if wait > 0:
                raise RateLimited(
                    f"tenant {tenant.name!r} is over its limit of {tenant.tpm} tokens per minute",
                    retry_after_s=wait,
                )
        self._running[tenant.name] += 1

    def release(self, tenant: Tenant) -> None:
        self._running[tenant.name] -= 1

    @contextlib.asynccontextmanager
    async def admitted(self, tenant: Tenant) -> AsyncIterator[None]:
        """The tenant's request slot for the duration of the block; refused as `admit` refuses."""
        await self.admit(tenant)
        try:
            yield
        finally:
            self.release(tenant)

    async def charge(self, tenant: Tenant, tokens: int) -> None:
        if tenant.tpm and tokens:
            await self._buckets.acquire(
                f"tpm:{tenant.name}", tenant.tpm / 60, tenant.tpm, tokens, NO_REQUIREMENT
            )


class QueueFull(ResourceExhausted):
    """A tier's queue is full; the request is refused at once rather than left waiting."""

    reason = "QUEUE_FULL"


class TierQueue:
    """At most `max_concurrent` requests at a tier; `max_queue` wait, highest priority first."""

    def __init__(self, tier: str, max_concurrent: int, max_queue: int) -> None:
        self.tier = tier
        self._max_concurrent = max_concurrent
        self._max_queue = max_queue
        self._running = 0
        self._waiting: list[tuple[int, int, asyncio.Future[None]]] = []
        self._order = itertools.count()

    @property
    def depth(self) -> int:
        return len(self._waiting)

    async def acquire(self, priority: int) -> None:
        if self._running < self._max_concurrent and not self._waiting:
            self._running += 1
            return
        if len(self._waiting) >= self._max_queue:
            raise QueueFull(
                f"the {self.tier} tier is busy: {self._max_concurrent} running, "
                f"{len(self._waiting)} waiting",
                retry_after_s=1,
            )
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (-priority, next(self._order), future)
        heapq.heappush(self._waiting, entry)
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.release()  # the slot was handed over just as the caller left
            else:
                self._waiting.remove(entry)
                heapq.heapify(self._waiting)
            raise

    @contextlib.asynccontextmanager
    async def slot(self, priority: int) -> AsyncIterator[None]:
        """A slot at the tier for the duration of the block, waiting for it as `acquire` does."""
        await self.acquire(priority)
        try:
            yield
        finally:
            self.release()

    def release(self) -> None:
        while self._waiting:
            _, _, future = heapq.heappop(self._waiting)
            if not future.done():
                future.set_result(None)  # the slot passes straight to the next waiter
                return
        self._running -= 1
