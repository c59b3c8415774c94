"""The KV-cache service's configuration section."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from slm.config import Section, ServiceEndpoint


class MooncakeConfig(Section):
    """A Mooncake distributed store (mooncake-transfer-engine; its master must be running)."""

    local_hostname: str = "localhost"
    metadata_server: str = "http://127.0.0.1:8080/metadata"
    master_server_address: str = "127.0.0.1:50051"
    protocol: Literal["tcp", "rdma"] = "tcp"
    device_name: str = ""
    global_segment_size_mb: int = Field(default=3200, ge=1)
    local_buffer_size_mb: int = Field(default=512, ge=1)


class KVCacheConfig(Section):
    endpoint: ServiceEndpoint = ServiceEndpoint(port=50054, metrics_port=9154)
    # Memory tier budget (least recently used entries go first).
    memory_mb: int = Field(default=1024, ge=0)
    # Disk tier: survives restarts; 0 disables it.
    disk_dir: Path = Path("~/.cache/service-slm/kv-cache")
    disk_mb: int = Field(default=8192, ge=0)
    # Optional third tier shared across kv-cache replicas.
    backend: Literal["none", "mooncake"] = "none"
    mooncake: MooncakeConfig = MooncakeConfig()
    # Largest entry accepted by Put.
    max_entry_mb: int = Field(default=512, ge=1)

    @field_validator("disk_dir")
    @classmethod
    def _expand(cls, value: Path) -> Path:
        return value.expanduser()
