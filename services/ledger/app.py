"""Builds the ledger service from its configuration section."""

from __future__ import annotations

import grpc

from ledger.config import LedgerConfig
from ledger.servicer import LedgerServicer
from ledger.store import Backend, LedgerStore
from slm.runtime import Runtime
from slm.v1 import ledger_pb2, ledger_pb2_grpc


class LedgerApp:
    service_names: tuple[str, ...] = (
        ledger_pb2.DESCRIPTOR.services_by_name["LedgerService"].full_name,
    )

    def __init__(self, store: LedgerStore) -> None:
        self.store = store

    def add_to_server(self, server: grpc.aio.Server) -> None:
        ledger_pb2_grpc.add_LedgerServiceServicer_to_server(LedgerServicer(self.store), server)

    async def start(self) -> None:
        await self.store.open()

    async def stop(self) -> None:
        await self.store.close()


def build_backend(config: LedgerConfig) -> Backend:
    if config.backend == "postgresql":
        from ledger.postgres import PostgresBackend

        if not config.postgres_dsn:
            raise ValueError(
                "ledger: backend = 'postgresql' needs postgres_dsn (SLM_LEDGER__POSTGRES_DSN)"
            )

        return PostgresBackend(config.postgres_dsn)
    from ledger.sqlite import SqliteBackend

    return SqliteBackend(config.database)


def build_app(config: LedgerConfig, runtime: Runtime) -> LedgerApp:
    return LedgerApp(LedgerStore(build_backend(config)))
