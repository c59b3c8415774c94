"""The service table: every process of the mesh, how to build it, where it listens, how it is
probed and how many replicas `slm up` runs. `slm serve`, `slm up` and the CLI all read it."""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from mesh.settings import Settings
from slm.config import ServiceEndpoint

# Which replica of its service a process is (set by `slm up`; 0 when run alone).
REPLICA_ENV = "SLM_REPLICA"
# glibc's malloc asks for transparent huge pages for its large blocks: llama.cpp's KV cache and
# compute buffers. Allocating a context of 32 slots x 2048 tokens (1.2 GB of KV) then takes
# 180 ms instead of 450 ms on this 2-core machine (the kernel faults in 2 MiB pages, not 4 KiB),
# which is what a standby model's first request or co-activation waits for; decode speed is
# unchanged (bench/results/coactivation_2026-12-06.md). The images set it too.
HUGE_PAGES = "glibc.malloc.hugetlb=1"


@dataclass(frozen=True)
class Service:
    """One process kind of the mesh."""

    name: str
    # grpc: a ServiceApp under slm.server.GrpcService; http: the REST gateway; envoy: the edge.
    kind: Literal["grpc", "http", "envoy"]
    # The Settings attribute holding its section.
    section: str
    # "module:function" building its ServiceApp from (section, Runtime); grpc services only.
    factory: str = ""
    # Whether `slm up` runs it with these settings.
    enabled: Callable[[Settings], bool] = lambda _settings: True
    # Whether its app takes its section anew on SIGHUP (`async reload(section)`); `slm up`
    # passes a SIGHUP on to these.
    reloads: bool = False
    # Environment `slm up` starts its processes with, unless the caller's own sets a name.
    env: tuple[tuple[str, str], ...] = ()
    # Its section as replica N runs it (what must differ between replicas: ports, files).
    replica_section: Callable[[Any, int], Any] = lambda section, _index: section

    def nice(self, settings: Settings) -> int:
        """The niceness `slm up` starts its processes with (a section's `nice`, else 0)."""
        return int(getattr(self.config(settings), "nice", 0))

    def config(self, settings: Settings) -> Any:
        return getattr(settings, self.section)

    def endpoint(self, settings: Settings) -> ServiceEndpoint:
        """Where the gRPC service listens (grpc kinds only)."""
        endpoint: ServiceEndpoint = self.config(settings).endpoint
        return endpoint

    def replicas(self, settings: Settings) -> int:
        if self.kind == "http":
            return settings.gateway.replicas
        return self.endpoint(settings).replicas if self.kind == "grpc" else 1

    def build(self, settings: Settings, runtime: Any, replica: int = 0) -> Any:
        module, function = self.factory.split(":")
        section = self.replica_section(self.config(settings), replica)
        return getattr(importlib.import_module(module), function)(section, runtime)


# In start order: each service starts after the ones it calls.
SERVICES: tuple[Service, ...] = (
    Service("ledger", "grpc", "ledger", "ledger.app:build_app"),
    Service(
        "kv-cache",
        "grpc",
        "kv_cache",
        "kvcache.app:build_app",
        # Only a mesh whose inference-local uses the kv-cache service runs one.
        enabled=lambda settings: bool(settings.inference_local.kv_cache),
    ),
    Service("adapter-registry", "grpc", "adapters", "adapters.app:build_app"),
    Service(
        "inference-local",
        "grpc",
        "inference_local",
        "inference_local.app:build_app",
        reloads=True,
        env=(("GLIBC_TUNABLES", HUGE_PAGES),),
    ),
    Service("inference-remote", "grpc", "inference_remote", "inference_remote.app:build_app"),
    Service(
        "doorman",
        "grpc",
        "doorman",
        "doorman.app:build_app",
        replica_section=lambda section, index: section.for_replica(index),
    ),
    Service(
        "gateway",
        "http",
        "gateway",
        replica_section=lambda section, index: section.replica(index),
    ),
    Service("envoy", "envoy", "envoy"),
)
BY_NAME = {service.name: service for service in SERVICES}


def replica_index() -> int:
    return int(os.environ.get(REPLICA_ENV, "0") or 0)
