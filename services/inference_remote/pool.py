"""A pool of upstreams for one model: health, concurrency caps, least-outstanding balancing
with prefix affinity."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from inference_remote.upstream import Kind, UpstreamClient
from slm.errors import ResourceExhausted, Unavailable

log = logging.getLogger(__name__)


@dataclass
class Upstream:
    """One upstream of a pool and its live state (touched only on the event loop)."""

    name: str
    kind: Kind
    # The model's name at this upstream.
    model: str
    max_concurrency: int
    client: UpstreamClient
    adapter_mount: str | None = None
    outstanding: int = 0
    healthy: bool = False
    # LoRA adapters loaded at runtime: name -> sha256; forgotten when the upstream restarts.
    adapters: dict[str, str] = field(default_factory=dict)
    adapter_locks: dict[str, asyncio.Lock] = field(default_factory=dict)

    @property
    def free(self) -> bool:
        return self.outstanding < self.max_concurrency


def _score(key: bytes, name: str) -> bytes:
    return hashlib.blake2b(key + b"\0" + name.encode(), digest_size=8).digest()


class Pool:
    """Chooses an upstream per attempt and holds its slot until the attempt ends."""

    def __init__(
        self,
        model: str,
        upstreams: Sequence[Upstream],
        *,
        affinity_slack: int,
        on_health: Callable[[Pool, Upstream], None] = lambda p, u: None,
    ) -> None:
        self.model = model
        self.upstreams = list(upstreams)
        self._slack = affinity_slack
        self._changed = asyncio.Condition()
        self._round_robin = itertools.count()
        self._on_health = on_health

    def choose(
        self, key: bytes | None, exclude: set[str], eligible: Callable[[Upstream], bool]
    ) -> Upstream | None:
        """The upstream for the next attempt, or None when every candidate is at its cap.

        Raises Unavailable when no healthy candidate is left at all.
        """
        candidates = [
            u for u in self.upstreams if u.healthy and u.name not in exclude and eligible(u)
        ]
        if not candidates:
            raise Unavailable(
                f"no healthy upstream left for model {self.model!r}", retry_after_s=1.0
            )
        free = [u for u in candidates if u.free]
        if not free:
            return None
        least = min(u.outstanding for u in free)
        if key is not None:
            # Rendezvous hashing: a prefix keeps its upstream while that one is healthy, and
            # only the prefixes of a lost upstream move when it goes.
            preferred = max(candidates, key=lambda u: _score(key, u.name))
            if preferred.free and preferred.outstanding <= least + self._slack:
                return preferred
        # Rotate among the least busy, so equal loads spread instead of piling on the first.
        tied = [u for u in free if u.outstanding == least]
        return tied[next(self._round_robin) % len(tied)]

    async def acquire(
        self,
        key: bytes | None,
        exclude: set[str],
        eligible: Callable[[Upstream], bool],
        queue_timeout_s: float,
    ) -> Upstream:
        """Take a slot on the chosen upstream, waiting up to `queue_timeout_s` for one."""
        chosen = self.choose(key, exclude, eligible)
        if chosen is None:
            try:
                async with asyncio.timeout(queue_timeout_s), self._changed:
                    while (chosen := self.choose(key, exclude, eligible)) is None:
                        await self._changed.wait()
            except TimeoutError:
                raise ResourceExhausted(
                    f"every upstream of model {self.model!r} is at its concurrency limit",
                    retry_after_s=1.0,
                ) from None
        chosen.outstanding += 1
        await self._notify()
        return chosen

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        """Return once `predicate` holds; it is re-checked whenever a slot or health changes."""
        async with self._changed:
            await self._changed.wait_for(predicate)

    async def release(self, upstream: Upstream) -> None:
        upstream.outstanding -= 1
        await self._notify()

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def mark(self, upstream: Upstream, healthy: bool) -> None:
        if upstream.healthy == healthy:
            return
        upstream.healthy = healthy
        if healthy:
            # A server that was down may have restarted without the adapters we loaded.
            upstream.adapters.clear()
        log.warning(
            "upstream health changed",
            extra={"model": self.model, "upstream": upstream.name, "healthy": healthy},
        )
        self._on_health(self, upstream)
        await self._notify()

    async def probe_all(self) -> None:
        results = await asyncio.gather(*(u.client.probe() for u in self.upstreams))
        for upstream, healthy in zip(self.upstreams, results, strict=True):
            await self.mark(upstream, healthy)
