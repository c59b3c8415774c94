"""Envoy's configuration section: the listener in front of the gateway."""

from __future__ import annotations

from pydantic import Field

from slm.config import LOOPBACK, Section


class EnvoyConfig(Section):
    host: str = LOOPBACK
    port: int = Field(default=8080, ge=0, le=65535)
    admin_port: int = Field(default=9901, ge=0, le=65535)
    max_body_bytes: int = Field(default=1 << 20, ge=1024)
    # Longest silence allowed on a stream; generation streams send a chunk per token.
    stream_idle_timeout_s: int = Field(default=300, ge=1)
    # Where `slm up` writes the rendered envoy.yaml.
    binary: str | None = None
