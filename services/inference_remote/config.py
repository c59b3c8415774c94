"""inference-remote's configuration section: model pools of OpenAI-compatible upstreams."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from slm.config import LOOPBACK, Section, ServiceEndpoint


class UpstreamConfig(Section):
    """One OpenAI-compatible HTTP server behind inference-remote."""

    # Label in metrics, logs and StreamEnd.upstream; unique within the model.
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9._-]+$")
    # Base URL of the OpenAI API, with its /v1, e.g. "http://vllm-0:8000/v1".
    url: str = Field(pattern=r"^https?://[^/]+")
    # "vllm": tier gpu, loads LoRA adapters at run time; "openai": tier gpu, any other
    # OpenAI-compatible server (llama.cpp, another mesh); "external": tier external, host
    # must be on inference_remote.external_allowlist and an API key is required.
    kind: Literal["vllm", "openai", "external"] = "vllm"
    # The model's name at this upstream; default: the name clients use.
    model: str | None = None
    # Requests in flight to this upstream at most; more wait (up to queue_timeout_s).
    max_concurrency: int = Field(default=16, ge=1)
    # Bearer key: read from this file (e.g. a mounted Secret) or this environment variable.
    api_key_file: Path | None = None
    api_key_env: str | None = None
    # Where the upstream sees the adapter registry's store (a shared volume); default: the
    # registry's own path, for upstreams on the same host.
    adapter_mount: str | None = None


class RemoteModelConfig(Section):
    """A model served by a pool of upstreams."""

    name: str = Field(min_length=1)
    upstreams: list[UpstreamConfig] = Field(min_length=1)
    context_length: int = Field(default=0, ge=0)


class InferenceRemoteConfig(Section):
    endpoint: ServiceEndpoint = ServiceEndpoint(port=50053, metrics_port=9153)
    # Empty: the service starts, serves health, and lists no models.
    models: list[RemoteModelConfig] = []
    # Hosts "external" upstreams may have; any other is refused when the config loads.
    external_allowlist: list[str] = []
    connect_timeout_s: float = Field(default=5.0, gt=0)
    # Longest wait for the first token; past it the request is retried on another upstream.
    first_token_timeout_s: float = Field(default=60.0, gt=0)
    # Longest silence between two chunks once the stream has started.
    read_timeout_s: float = Field(default=60.0, gt=0)
    # Upstreams tried per request, all before the first token.
    max_attempts: int = Field(default=3, ge=1)
    # Longest wait for a free slot when every healthy upstream is at max_concurrency.
    queue_timeout_s: float = Field(default=5.0, ge=0)
    health_interval_s: float = Field(default=5.0, gt=0)
    # Requests whose first this-many characters agree go to the same upstream while it is
    # healthy and not busier than the least busy by more than affinity_slack; 0 disables.
    prefix_affinity_chars: int = Field(default=256, ge=0)
    affinity_slack: int = Field(default=4, ge=0)
    # AdapterRegistryService, asked on an adapter's first use; "" disables adapters.
    adapter_registry: str = f"{LOOPBACK}:50055"

    @model_validator(mode="after")
    def _external_upstreams(self) -> InferenceRemoteConfig:
        from urllib.parse import urlsplit

        allowed = {host.lower() for host in self.external_allowlist}
        for model in self.models:
            names = [u.name for u in model.upstreams]
            if len(set(names)) != len(names):
                raise ValueError(f"inference_remote model {model.name!r}: upstream names repeat")
            for upstream in model.upstreams:
                if upstream.kind != "external":
                    continue
                host = (urlsplit(upstream.url).hostname or "").lower()
                if host not in allowed:
                    raise ValueError(
                        f"inference_remote upstream {upstream.name!r}: host {host!r} is not on "
                        "inference_remote.external_allowlist"
                    )
                if upstream.api_key_file is None and upstream.api_key_env is None:
                    raise ValueError(
                        f"inference_remote upstream {upstream.name!r}: an external upstream "
                        "needs api_key_file or api_key_env"
                    )
        return self
