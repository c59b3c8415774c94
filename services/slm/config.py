"""Configuration building blocks every service shares: sections, endpoints, telemetry, discovery.

Each service defines its own section in its own `config.py`; the composition root (mesh.settings)
assembles them into the mesh's one TOML file.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

LOOPBACK = "127.0.0.1"
# Replica k of a service listens this many ports times k above the first (the default ports of
# the services lie next to each other).
REPLICA_PORT_STEP = 100


class Section(BaseModel):
    """A config table: unknown keys are errors, so typos never pass silently."""

    model_config = ConfigDict(extra="forbid", validate_default=True)


def replica_port(port: int, index: int) -> int:
    """The port replica `index` of a replicated listener takes (0, any free port, stays 0)."""
    return port + REPLICA_PORT_STEP * index if port else 0


def dial_host(host: str) -> str:
    """How a caller on this machine reaches a listener bound to `host`: a wildcard as loopback."""
    return LOOPBACK if host in ("0.0.0.0", "", "::") else host


class ServiceEndpoint(Section):
    """Where a gRPC service listens, and where its Prometheus metrics are served."""

    host: str = LOOPBACK
    port: int = Field(ge=0, le=65535)
    metrics_port: int = Field(ge=0, le=65535)
    # Processes `slm up` runs of this service; replica k listens on port + 100 k and
    # metrics_port + 100 k, and every address naming the first is widened to all of them.
    replicas: int = Field(default=1, ge=1, le=16)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def replica(self, index: int) -> ServiceEndpoint:
        """The endpoint of replica `index` (0 is this one)."""
        if not 0 <= index < self.replicas:
            raise ValueError(f"replica {index} of {self.replicas}")
        return self.model_copy(
            update={
                "port": replica_port(self.port, index),
                "metrics_port": replica_port(self.metrics_port, index),
            }
        )

    @property
    def addresses(self) -> list[str]:
        """Where callers reach every replica (wildcard hosts as loopback)."""
        host = dial_host(self.host)
        return [f"{host}:{replica_port(self.port, k)}" for k in range(self.replicas)]


class DiscoveryConfig(Section):
    """How a service turns the addresses in this file into gRPC targets (see slm.discovery)."""

    # static: addresses are used as written (the embedded default, no per-request cost);
    # kubernetes: bare Service names become cluster DNS names, balanced over headless Services;
    # consul: bare names are Consul services, resolved to healthy instances and followed.
    mode: Literal["static", "kubernetes", "consul"] = "static"
    namespace: str = "default"
    cluster_domain: str = "cluster.local"
    consul_url: str = "http://127.0.0.1:8500"
    consul_token: str | None = None
    # Register this service in Consul with a gRPC health check, checked this often.
    consul_register: bool = True
    consul_check_interval_s: float = Field(default=10.0, gt=0)
    # kubernetes: the DNS server to ask ("host:port"); empty: the system's resolver. gRPC's
    # resolver and the replica listing for fan-out both use it.
    dns_server: str = ""
    # Longest a blocking query waits for a change before it is asked again.
    consul_wait_s: float = Field(default=60.0, gt=0)
    # The address other services reach this one at, registered in Consul (default: the host).
    advertise_host: str | None = None


class TelemetryConfig(Section):
    log_level: str = "INFO"
    # Off unless set: e.g. "http://127.0.0.1:4317".
    otlp_endpoint: str | None = None
    # Log prompt and completion text (never in production).
    debug_log_content: bool = False


def host_of(address: str) -> str:
    host = address.rsplit(":", 1)[0] if ":" in address else address
    return host.strip("[]").lower()
