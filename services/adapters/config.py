"""The adapter registry's configuration section."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from slm.config import Section, ServiceEndpoint


class AdapterRegistryConfig(Section):
    endpoint: ServiceEndpoint = ServiceEndpoint(port=50055, metrics_port=9155)
    # Content-addressed artefacts: <store_dir>/<sha256>/.
    store_dir: Path = Path("~/.cache/service-slm/adapters")
    # "sqlite" (embedded default, `database`) or "postgresql" (`postgres_dsn`).
    backend: Literal["sqlite", "postgresql"] = "sqlite"
    database: Path = Path("~/.cache/service-slm/adapters.sqlite3")
    # e.g. "postgresql://slm@db:5432/adapters"; put a password in SLM_ADAPTERS__POSTGRES_DSN.
    # Checked when the adapters starts, not here: only its pods get the DSN from a Secret, and
    # every other service reads this file too.
    postgres_dsn: str = ""
    # Local source paths must lie inside one of these; empty: any path the service can read.
    source_dirs: list[Path] = []
    # Largest artefact accepted, in bytes.
    max_artefact_bytes: int = Field(default=4 << 30, ge=1)

    @field_validator("store_dir", "database")
    @classmethod
    def _expand(cls, value: Path) -> Path:
        return value.expanduser()
