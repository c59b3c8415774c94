"""Service discovery: configured addresses to gRPC channels (static, Kubernetes DNS, Consul)."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Protocol
from urllib.parse import urlsplit

import grpc

from slm import telemetry as otel
from slm.config import DiscoveryConfig, TelemetryConfig
from slm.server import CHANNEL_OPTIONS, open_channel

log = logging.getLogger(__name__)

# gRPC's client-side balancing over every address a name resolves to; the default, pick_first,
# would pin all traffic of a long-lived channel to one replica.
ROUND_ROBIN = '{"loadBalancingConfig": [{"round_robin": {}}]}'


@dataclass(frozen=True)
class Instance:
    """One healthy endpoint of a service."""

    host: str
    port: int


def split_address(address: str) -> tuple[str, int]:
    """ "host:port" (IPv6 in brackets) into its parts; a clear error for anything else."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"address {address!r} is not host:port")
    return host.strip("[]"), int(port)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def is_service_name(host: str) -> bool:
    """A bare name (no dots, not an IP, not localhost) names a service to be discovered."""
    return bool(host) and "." not in host and host != "localhost" and not _is_ip(host)


def instances_target(instances: Sequence[Instance]) -> str:
    """A gRPC target naming every instance, so round_robin balances over all of them."""
    if not instances:
        raise ValueError("no instances")
    if all(_is_ip(i.host) and ipaddress.ip_address(i.host).version == 4 for i in instances):
        return "ipv4:" + ",".join(f"{i.host}:{i.port}" for i in instances)
    if all(_is_ip(i.host) for i in instances):
        return "ipv6:" + ",".join(f"[{i.host}]:{i.port}" for i in instances)
    # gRPC's target syntax lists several addresses only as IPs; DNS names go one at a time.
    first = instances[0]
    return f"dns:///{first.host}:{first.port}"


class Resolver(Protocol):
    """Maps a configured address to a gRPC target, and says whether that target moves."""

    def resolve(self, address: str) -> str: ...

    def follows(self, address: str) -> bool:
        """True when the address's instances change at run time and must be watched."""


class StaticResolver:
    """The embedded default: addresses are gRPC targets as written."""

    def resolve(self, address: str) -> str:
        return address

    def follows(self, address: str) -> bool:
        return False


@dataclass(frozen=True)
class KubernetesResolver:
    """Bare Service names become cluster DNS names; gRPC's DNS resolver sees every pod IP of a
    headless Service and re-resolves when connections fail, so scaled replicas are used."""

    namespace: str
    cluster_domain: str = "cluster.local"

    def resolve(self, address: str) -> str:
        if "://" in address:
            return address
        host, port = split_address(address)
        if _is_ip(host):
            return address
        if is_service_name(host):
            host = f"{host}.{self.namespace}.svc.{self.cluster_domain}"
        return f"dns:///{host}:{port}"

    def follows(self, address: str) -> bool:
        return False


class ConsulResolver:
    """Bare names are Consul services: registered with gRPC health checks, resolved to passing
    instances, and followed with blocking queries (X-Consul-Index)."""

    def __init__(self, client: Any, wait_s: float = 60.0) -> None:
        # A py-consul asyncio client (consul.aio.Consul); it owns the HTTP session.
        self._client = client
        self._wait = f"{max(1, round(wait_s))}s"

    @classmethod
    def from_config(cls, config: DiscoveryConfig) -> ConsulResolver:
        import consul.aio

        url = urlsplit(config.consul_url)
        client = consul.aio.Consul(
            host=url.hostname or "127.0.0.1",
            port=url.port or 8500,
            scheme=url.scheme or "http",
            token=config.consul_token,
        )
        return cls(client, config.consul_wait_s)

    async def close(self) -> None:
        await self._client.close()

    def resolve(self, address: str) -> str:
        # A following channel starts on the address as written and moves once Consul answers.
        return address

    def follows(self, address: str) -> bool:
        return "://" not in address and is_service_name(split_address(address)[0])

    async def healthy(self, service: str, index: int | None = None) -> tuple[int, list[Instance]]:
        """The instances whose checks pass, and the index to block on for the next change."""
        kwargs: dict[str, Any] = {"passing": True}
        if index:
            kwargs.update(index=index, wait=self._wait)
        new_index, entries = await self._client.health.service(service, **kwargs)
        instances = sorted(
            {
                Instance(e["Service"].get("Address") or e["Node"]["Address"], e["Service"]["Port"])
                for e in entries
            },
            key=lambda i: (i.host, i.port),
        )
        return int(new_index), instances

    async def watch(self, service: str) -> AsyncIterator[list[Instance]]:
        """Yield the healthy instances now, then each time the set changes."""
        index = 0
        last: list[Instance] | None = None
        backoff = 0.5
        while True:
            try:
                new_index, instances = await self.healthy(service, index)
            except asyncio.CancelledError:
                raise
            except Exception as error:  # Consul restarts or is unreachable: keep the last set.
                log.warning("consul query failed", extra={"service": service, "error": str(error)})
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 30.0)
                continue
            backoff = 0.5
            # Consul's rule: an index that goes backwards means a reset; start over from 0.
            index = new_index if new_index >= index else 0
            if instances != last:
                last = instances
                yield instances

    async def register(
        self, name: str, service_id: str, host: str, port: int, interval_s: float
    ) -> None:
        import consul

        check = consul.Check.grpc(f"{host}:{port}", f"{interval_s:g}s")
        ok = await self._client.agent.service.register(
            name, service_id=service_id, address=host, port=port, check=check
        )
        if not ok:
            raise RuntimeError(f"consul refused to register {service_id}")

    async def deregister(self, service_id: str) -> None:
        await self._client.agent.service.deregister(service_id)


def build_resolver(config: DiscoveryConfig) -> Resolver:
    if config.mode == "kubernetes":
        return KubernetesResolver(config.namespace, config.cluster_domain)
    if config.mode == "consul":
        return ConsulResolver.from_config(config)
    return StaticResolver()


def connect(resolver: Resolver, address: str, telemetry: TelemetryConfig) -> grpc.aio.Channel:
    """A channel to `address`: plain for fixed targets, a following one for Consul services."""
    if resolver.follows(address):
        assert isinstance(resolver, ConsulResolver)
        return FollowingChannel(resolver, address, telemetry)
    target = resolver.resolve(address)
    if target.startswith(("dns:", "ipv4:", "ipv6:")):
        return balanced_channel(target, telemetry)
    return open_channel(target, telemetry)


def balanced_channel(target: str, telemetry: TelemetryConfig) -> grpc.aio.Channel:
    """open_channel's channel, balancing round-robin over every address the target names."""
    return grpc.aio.insecure_channel(
        target,
        options=[*CHANNEL_OPTIONS, ("grpc.service_config", ROUND_ROBIN)],
        interceptors=otel.client_interceptors(telemetry),
    )


class _Delegate:
    """A multicallable that binds to whichever channel is current when it is called."""

    def __init__(
        self, owner: FollowingChannel, kind: str, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        self._owner = owner
        self._kind = kind
        self._args = args
        self._kwargs = kwargs

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        factory: Callable[..., Any] = getattr(self._owner.current, self._kind)
        return factory(*self._args, **self._kwargs)(*args, **kwargs)


class FollowingChannel(grpc.aio.Channel):  # type: ignore[misc]
    """A channel whose target follows a Consul service's healthy instances.

    Each change opens a channel to the new set and closes the old one with a grace period, so
    streams in flight finish where they started. Only Consul mode pays the per-call indirection.
    """

    def __init__(
        self,
        resolver: ConsulResolver,
        address: str,
        telemetry: TelemetryConfig,
        *,
        grace_s: float = 30.0,
    ) -> None:
        self._resolver = resolver
        self._service = split_address(address)[0]
        self._telemetry = telemetry
        self._grace_s = grace_s
        self.current: grpc.aio.Channel = open_channel(address, telemetry)
        self.target = address
        self.changed = asyncio.Condition()
        self._retired: set[asyncio.Task[None]] = set()
        self._task = asyncio.get_running_loop().create_task(self._follow())

    async def _follow(self) -> None:
        async for instances in self._resolver.watch(self._service):
            if not instances:
                # Keep the last channel: its instances may come back, and gRPC retries them.
                log.warning("no healthy instance", extra={"service": self._service})
                continue
            target = instances_target(instances)
            old = self.current
            self.current = balanced_channel(target, self._telemetry)
            self.target = target
            log.info("instances changed", extra={"service": self._service, "target": target})
            retire = asyncio.get_running_loop().create_task(old.close(self._grace_s))
            self._retired.add(retire)
            retire.add_done_callback(self._retired.discard)
            async with self.changed:
                self.changed.notify_all()

    def unary_unary(self, *args: Any, **kwargs: Any) -> Any:
        return _Delegate(self, "unary_unary", args, kwargs)

    def unary_stream(self, *args: Any, **kwargs: Any) -> Any:
        return _Delegate(self, "unary_stream", args, kwargs)

    def stream_unary(self, *args: Any, **kwargs: Any) -> Any:
        return _Delegate(self, "stream_unary", args, kwargs)

    def stream_stream(self, *args: Any, **kwargs: Any) -> Any:
        return _Delegate(self, "stream_stream", args, kwargs)

    def get_state(self, try_to_connect: bool = False) -> grpc.ChannelConnectivity:
        return self.current.get_state(try_to_connect)

    async def wait_for_state_change(self, last_observed_state: grpc.ChannelConnectivity) -> None:
        await self.current.wait_for_state_change(last_observed_state)

    async def channel_ready(self) -> None:
        await self.current.channel_ready()

    async def close(self, grace: float | None = None) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        await self.current.close(grace)
        for task in list(self._retired):
            task.cancel()

    async def __aenter__(self) -> FollowingChannel:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close(None)


@contextlib.asynccontextmanager
async def registration(
    config: DiscoveryConfig, name: str, host: str, port: int
) -> AsyncIterator[None]:
    """While inside, the service is registered in Consul (in consul mode; otherwise a no-op)."""
    if config.mode != "consul" or not config.consul_register:
        yield
        return
    resolver = ConsulResolver.from_config(config)
    advertised = config.advertise_host or host
    if advertised in ("0.0.0.0", "", "::"):
        advertised = socket.gethostbyname(socket.gethostname())
    service_id = f"{name}-{advertised}-{port}"
    try:
        await resolver.register(name, service_id, advertised, port, config.consul_check_interval_s)
        log.info("registered in consul", extra={"service_id": service_id})
        try:
            yield
        finally:
            # Deregister before draining, so callers stop picking this instance first.
            await resolver.deregister(service_id)
    finally:
        await resolver.close()
