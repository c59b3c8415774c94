"""The ledger's configuration section."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import field_validator

from slm.config import Section, ServiceEndpoint


class LedgerConfig(Section):
    endpoint: ServiceEndpoint = ServiceEndpoint(port=50056, metrics_port=9156)
    # "sqlite" (embedded default, `database`) or "postgresql" (`postgres_dsn`).
    backend: Literal["sqlite", "postgresql"] = "sqlite"
    database: Path = Path("~/.cache/service-slm/ledger.sqlite3")
    # e.g. "postgresql://slm@db:5432/ledger"; put a password in SLM_LEDGER__POSTGRES_DSN.
    # Checked when the ledger starts, not here: only its pods get the DSN from a Secret, and
    # every other service reads this file too.
    postgres_dsn: str = ""

    @field_validator("database")
    @classmethod
    def _expand(cls, value: Path) -> Path:
        return value.expanduser()
