"""Service discovery: addresses to balanced gRPC channels (static, Kubernetes DNS, Consul).

Every gRPC hop of the mesh gets its channels from one Connector, built once from `[discovery]`:
a channel balances round-robin over every instance an address names, skipping instances whose
gRPC health check fails; `instances` lists them for calls that must reach each one (fan-out).
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import ipaddress
import itertools
import json
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
# would pin all traffic of a long-lived channel to one replica. The health check (grpc.health.v1
# Watch, which every service of the mesh serves) takes an instance out of the rotation while it
# reports NOT_SERVING: starting, draining or gone.
ROUND_ROBIN = json.dumps(
    {"loadBalancingConfig": [{"round_robin": {}}], "healthCheckConfig": {"serviceName": ""}}
)


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
    """The embedded default: addresses are gRPC targets as written; a comma-separated list of
    IP addresses (the replicas `slm up` runs) becomes one target over all of them."""

    def resolve(self, address: str) -> str:
        if "," not in address:
            return address
        return instances_target([Instance(*split_address(a)) for a in address.split(",")])

    def follows(self, address: str) -> bool:
        return False


@dataclass(frozen=True)
class KubernetesResolver:
    """Bare Service names become cluster DNS names; gRPC's DNS resolver sees every pod IP of a
    headless Service and re-resolves when connections fail, so scaled replicas are used."""

    namespace: str
    cluster_domain: str = "cluster.local"
    # "host:port" of the DNS server gRPC asks; empty: the system's resolver.
    dns_server: str = ""

    def name(self, host: str) -> str:
        """The DNS name a configured host stands for."""
        if is_service_name(host):
            return f"{host}.{self.namespace}.svc.{self.cluster_domain}"
        return host

    def resolve(self, address: str) -> str:
        if "://" in address:
            return address
        host, port = split_address(address)
        if _is_ip(host):
            return address
        return f"dns://{self.dns_server}/{self.name(host)}:{port}"

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
        return KubernetesResolver(config.namespace, config.cluster_domain, config.dns_server)
    if config.mode == "consul":
        return ConsulResolver.from_config(config)
    return StaticResolver()


def connect(resolver: Resolver, address: str, telemetry: TelemetryConfig) -> grpc.aio.Channel:
    """A channel balancing over every instance of `address`; Consul services are followed."""
    if resolver.follows(address):
        assert isinstance(resolver, ConsulResolver)
        return FollowingChannel(resolver, address, telemetry)
    return balanced_channel(resolver.resolve(address), telemetry)


class Connector:
    """The mesh's one way to reach a service, built once from `[discovery]` and shared by every
    hop of a process. Channels are made on first use and cached; `close` closes them all."""

    def __init__(self, config: DiscoveryConfig, telemetry: TelemetryConfig) -> None:
        self.config = config
        self.telemetry = telemetry
        self.resolver = build_resolver(config)
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._instance_channels: dict[str, grpc.aio.Channel] = {}
        self._model_channels: dict[str, ModelRoutedChannel] = {}

    def channel(self, address: str) -> grpc.aio.Channel:
        """Balances round-robin over every healthy instance of `address`."""
        if address not in self._channels:
            self._channels[address] = connect(self.resolver, address, self.telemetry)
        return self._channels[address]

    def model_channel(self, address: str) -> grpc.aio.Channel:
        """Like `channel`, but a call whose request names a model that only some instances hold
        goes to those (slm.v1.InferenceService's ListModels says which)."""
        if isinstance(self.resolver, StaticResolver) and "," not in address:
            # One fixed instance: nothing to choose between, so no ListModels to poll.
            return self.channel(address)
        if address not in self._model_channels:
            self._model_channels[address] = ModelRoutedChannel(self, address)
        return self._model_channels[address]

    def instance_channel(self, instance: str) -> grpc.aio.Channel:
        """A channel to one instance ("host:port", as `instances` lists it)."""
        if instance not in self._instance_channels:
            self._instance_channels[instance] = balanced_channel(instance, self.telemetry)
        return self._instance_channels[instance]

    async def instances(self, address: str) -> list[str]:
        """Every instance `address` stands for now, as "host:port": for calls that must reach
        each replica (loading a model, reading metrics) rather than any one."""
        resolver = self.resolver
        if isinstance(resolver, ConsulResolver) and resolver.follows(address):
            _index, healthy = await resolver.healthy(split_address(address)[0])
            return [_join(i.host, i.port) for i in healthy]
        if isinstance(resolver, KubernetesResolver) and "://" not in address:
            host, port = split_address(address)
            if not _is_ip(host):
                ips = await _lookup(resolver.name(host), resolver.dns_server)
                return [_join(ip, port) for ip in ips]
        return [a.strip() for a in address.split(",") if a.strip()]

    async def close(self) -> None:
        for routed in self._model_channels.values():
            await routed.close(None)
        for channel in [*self._channels.values(), *self._instance_channels.values()]:
            await channel.close(None)
        self._channels.clear()
        self._instance_channels.clear()
        self._model_channels.clear()
        if isinstance(self.resolver, ConsulResolver):
            await self.resolver.close()


def _join(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def _lookup(name: str, server: str) -> list[str]:
    """The A and AAAA records of `name`, from `server` ("host:port") or the system's resolver."""
    import dns.asyncresolver
    import dns.exception
    import dns.resolver

    resolver = dns.asyncresolver.Resolver(configure=not server)
    if server:
        host, port = split_address(server)
        resolver.nameservers = [host]
        resolver.port = port
    found: list[str] = []
    for kind in ("A", "AAAA"):
        try:
            answer = await resolver.resolve(name, kind, search=False)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            continue
        except dns.exception.DNSException as error:
            raise OSError(f"cannot resolve {name}: {error}") from error
        found += [record.to_text() for record in answer]
    if not found and not server:
        # Names outside DNS (/etc/hosts, localhost) through the system's resolver.
        infos = await asyncio.get_running_loop().getaddrinfo(name, None, type=socket.SOCK_STREAM)
        found = [str(info[4][0]) for info in infos]
    return sorted(set(found))


def balanced_channel(target: str, telemetry: TelemetryConfig) -> grpc.aio.Channel:
    """open_channel's channel, balancing round-robin over every address the target names."""
    return grpc.aio.insecure_channel(
        target,
        options=[*CHANNEL_OPTIONS, ("grpc.service_config", ROUND_ROBIN)],
        interceptors=otel.client_interceptors(telemetry),
    )


class _Delegate:
    """A multicallable that binds, when it is called, to the channel `pick` chooses for the
    request."""

    def __init__(
        self,
        pick: Callable[[Any], grpc.aio.Channel],
        kind: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> None:
        self._pick = pick
        self._kind = kind
        self._args = args
        self._kwargs = kwargs

    def __call__(self, request: Any, *args: Any, **kwargs: Any) -> Any:
        factory: Callable[..., Any] = getattr(self._pick(request), self._kind)
        return factory(*self._args, **self._kwargs)(request, *args, **kwargs)


class _PickingChannel(grpc.aio.Channel):  # type: ignore[misc]
    """A channel whose calls each go to the channel `pick` chooses for their request."""

    @abc.abstractmethod
    def pick(self, request: Any) -> grpc.aio.Channel:
        """The channel a call with this request goes to."""

    @property
    @abc.abstractmethod
    def current(self) -> grpc.aio.Channel:
        """The channel connectivity questions are answered by."""

    def unary_unary(self, *args: Any, **kwargs: Any) -> Any:
        return _Delegate(self.pick, "unary_unary", args, kwargs)

    def unary_stream(self, *args: Any, **kwargs: Any) -> Any:
        return _Delegate(self.pick, "unary_stream", args, kwargs)

    def stream_unary(self, *args: Any, **kwargs: Any) -> Any:
        return _Delegate(self.pick, "stream_unary", args, kwargs)

    def stream_stream(self, *args: Any, **kwargs: Any) -> Any:
        return _Delegate(self.pick, "stream_stream", args, kwargs)

    def get_state(self, try_to_connect: bool = False) -> grpc.ChannelConnectivity:
        return self.current.get_state(try_to_connect)

    async def wait_for_state_change(self, last_observed_state: grpc.ChannelConnectivity) -> None:
        await self.current.wait_for_state_change(last_observed_state)

    async def channel_ready(self) -> None:
        await self.current.channel_ready()

    async def __aenter__(self) -> _PickingChannel:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close(None)


class ModelRoutedChannel(_PickingChannel):
    """Calls whose request names a model go to the instances that hold it.

    Every `refresh_s` each instance is asked for its models (InferenceService.ListModels). A
    model every instance holds, or none is known to, takes the balanced channel; one that only
    some hold goes round-robin over those, skipping any whose connection has failed.
    """

    def __init__(self, connector: Connector, address: str, refresh_s: float = 2.0) -> None:
        self._connector = connector
        self._address = address
        self._refresh_s = refresh_s
        self._balanced = connector.channel(address)
        self._holders: dict[str, tuple[str, ...]] = {}
        self._everywhere: frozenset[str] = frozenset()
        self._turn = itertools.count()
        self._task = asyncio.get_running_loop().create_task(self._follow())

    @property
    def current(self) -> grpc.aio.Channel:
        return self._balanced

    def pick(self, request: Any) -> grpc.aio.Channel:
        model = getattr(request, "model", "")
        holders = self._holders.get(model) if model else None
        if not holders or model in self._everywhere:
            return self._balanced
        live = [
            h
            for h in holders
            if self._connector.instance_channel(h).get_state()
            is not grpc.ChannelConnectivity.TRANSIENT_FAILURE
        ]
        chosen = (live or list(holders))[next(self._turn) % len(live or holders)]
        return self._connector.instance_channel(chosen)

    async def refresh(self) -> None:
        from slm.v1 import inference_pb2, inference_pb2_grpc

        instances = await self._connector.instances(self._address)
        holders: dict[str, list[str]] = {}
        for instance in instances:
            stub = inference_pb2_grpc.InferenceServiceStub(
                self._connector.instance_channel(instance)
            )
            try:
                listed = await stub.ListModels(inference_pb2.ListModelsRequest(), timeout=2)
            except grpc.aio.AioRpcError:
                continue  # down or starting: it holds nothing for now
            for info in listed.models:
                holders.setdefault(info.name, []).append(instance)
        self._holders = {model: tuple(hs) for model, hs in holders.items()}
        self._everywhere = frozenset(m for m, hs in holders.items() if len(hs) == len(instances))

    async def _follow(self) -> None:
        while True:
            try:
                await self.refresh()
            except asyncio.CancelledError:
                raise
            except Exception as error:  # DNS or Consul briefly away: keep the last view.
                log.warning(
                    "listing models failed", extra={"address": self._address, "error": str(error)}
                )
            await asyncio.sleep(self._refresh_s)

    async def close(self, grace: float | None = None) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


class FollowingChannel(_PickingChannel):
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
        self._current: grpc.aio.Channel = open_channel(address, telemetry)
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
            old = self._current
            self._current = balanced_channel(target, self._telemetry)
            self.target = target
            log.info("instances changed", extra={"service": self._service, "target": target})
            retire = asyncio.get_running_loop().create_task(old.close(self._grace_s))
            self._retired.add(retire)
            retire.add_done_callback(self._retired.discard)
            async with self.changed:
                self.changed.notify_all()

    @property
    def current(self) -> grpc.aio.Channel:
        return self._current

    def pick(self, request: Any) -> grpc.aio.Channel:
        return self._current

    async def close(self, grace: float | None = None) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        await self.current.close(grace)
        for task in list(self._retired):
            task.cancel()


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
