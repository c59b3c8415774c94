"""The adapter registry with its metadata in a real PostgreSQL server started by the tests."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from postgres_server import PostgresServer

from adapters.app import build_registry
from adapters.artefacts import Format
from adapters.config import AdapterRegistryConfig
from adapters.registry import Registration
from slm.errors import NotFound, SlmError


def registration(name: str, source: Path, base: str = "gemma-3-270m") -> Registration:
    return Registration(name=name, base_model=base, format=Format.GGUF, source=str(source))


def write_gguf(path: Path, payload: bytes) -> Path:
    # The registry checks the GGUF magic only; the artefact's bytes are what it hashes.
    path.write_bytes(b"GGUF" + payload)
    return path


async def test_postgres_metadata(postgres: PostgresServer, tmp_path: Path) -> None:
    dsn = await postgres.new_database()
    config = AdapterRegistryConfig(
        store_dir=tmp_path / "store", backend="postgresql", postgres_dsn=dsn
    )
    source = write_gguf(tmp_path / "a.gguf", b"\x03\x00\x00\x00" + bytes(1000))
    registry = build_registry(config)
    await registry.open()
    try:
        first = await registry.register(registration("b-adapter", source))
        await registry.register(registration("a-adapter", source, base="other"))
        with pytest.raises(SlmError) as caught:
            await registry.register(registration("a-adapter", source))
        assert caught.value.code == grpc.StatusCode.ALREADY_EXISTS
        page = await registry.list(page_size=1)
        assert [a.record.name for a in page.adapters] == ["a-adapter"]
        rest = await registry.list(page_size=1, page_token=page.next_page_token)
        assert [a.record.name for a in rest.adapters] == ["b-adapter"]
        assert [a.record.name for a in (await registry.list(base_model="other")).adapters] == [
            "a-adapter"
        ]
        assert (await registry.get("b-adapter")).record == first.record
    finally:
        await registry.close()

    # A second replica (a fresh process in production) sees the same records.
    replica = build_registry(config)
    await replica.open()
    try:
        await replica.delete("a-adapter")
        await replica.delete("b-adapter")
        with pytest.raises(NotFound):
            await replica.get("b-adapter")
        assert (await replica.list()).adapters == []
    finally:
        await replica.close()
