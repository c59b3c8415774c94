"""The mesh's configuration: one TOML file, overridden by SLM_* environment variables.

Every field has an embedded default that runs the whole mesh on one machine, on loopback only.
Nested fields are overridden with a double underscore, e.g. SLM_DOORMAN__PORT=6000. Each section
is defined by the service that reads it; this module only assembles them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from adapters.config import AdapterRegistryConfig
from doorman.config import DoormanConfig
from gateway.config import GatewayConfig
from gateway.envoy.config import EnvoyConfig
from inference_local.config import InferenceLocalConfig
from inference_remote.config import InferenceRemoteConfig
from kvcache.config import KVCacheConfig
from ledger.config import LedgerConfig
from slm.config import DiscoveryConfig, TelemetryConfig

CONFIG_ENV = "SLM_CONFIG"


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
    inference_remote: InferenceRemoteConfig = InferenceRemoteConfig()
    adapters: AdapterRegistryConfig = AdapterRegistryConfig()
    kv_cache: KVCacheConfig = KVCacheConfig()

    @field_validator("state_dir")
    @classmethod
    def _expand(cls, value: Path) -> Path:
        return value.expanduser()

    @model_validator(mode="after")
    def _widen_to_replicas(self) -> Settings:
        """An address naming the first replica of a replicated service names all of them, so
        every caller balances over the replicas `slm up` runs."""
        if self.ledger.endpoint.replicas != 1 and self.ledger.backend == "sqlite":
            raise ValueError(
                "ledger.endpoint.replicas above 1 needs backend = 'postgresql': replicas share "
                "the chain's head through the database"
            )
        widen = {
            endpoint.addresses[0]: ",".join(endpoint.addresses)
            for endpoint in (
                self.inference_local.endpoint,
                self.inference_remote.endpoint,
                self.doorman.endpoint,
                self.ledger.endpoint,
                self.adapters.endpoint,
                self.kv_cache.endpoint,
            )
            if endpoint.replicas > 1
        }
        if widen:
            _widen(self, widen)
        return self

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


def _widen(model: BaseModel, widen: dict[str, str]) -> None:
    for name in type(model).model_fields:
        value = getattr(model, name)
        if isinstance(value, str) and value in widen:
            setattr(model, name, widen[value])
        elif isinstance(value, BaseModel):
            _widen(value, widen)
        elif isinstance(value, list):
            for item in value:
                if isinstance(item, BaseModel):
                    _widen(item, widen)
