"""The ledger's configuration section."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import field_validator, model_validator

from slm.config import Section, ServiceEndpoint


class LedgerConfig(Section):
    endpoint: ServiceEndpoint = ServiceEndpoint(port=50056, metrics_port=9156)
    # "sqlite" (embedded default, `database`) or "postgresql" (`postgres_dsn`).
    backend: Literal["sqlite", "postgresql"] = "sqlite"
    database: Path = Path("~/.cache/service-slm/ledger.sqlite3")
    # e.g. "postgresql://slm@db:5432/ledger"; put a password in SLM_LEDGER__POSTGRES_DSN.
    postgres_dsn: str = ""

    @field_validator("database")
    @classmethod
    def _expand(cls, value: Path) -> Path:
        return value.expanduser()

    @model_validator(mode="after")
    def _dsn_for_postgresql(self) -> LedgerConfig:
        if self.backend == "postgresql" and not self.postgres_dsn:
            raise ValueError("ledger: backend = 'postgresql' needs postgres_dsn")
        return self
