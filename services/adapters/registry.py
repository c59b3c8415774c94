"""The adapter registry's core: register, get (re-verified), list and delete adapters."""

from __future__ import annotations

import asyncio
import base64
import binascii
import re
import time
from dataclasses import dataclass
from pathlib import Path

from adapters.artefacts import ArtefactStore, Format
from adapters.metadata import AdapterRecord, AlreadyExists, MetadataStore
from slm.errors import InvalidArgument, NotFound

# No ":" so that "model:adapter" stays unambiguous; lower case so names never differ by case.
NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
SHA256 = re.compile(r"^[0-9a-f]{64}$")
TIER_NAMES = ("local", "gpu", "external")
MAX_PAGE = 1000
MAX_SCALE = 4.0


@dataclass(frozen=True)
class Registration:
    name: str
    base_model: str
    format: Format
    source: str
    sha256: str = ""
    default_scale: float = 1.0
    tiers: tuple[str, ...] = ()

    def validate(self) -> None:
        if not NAME.match(self.name):
            raise InvalidArgument(
                "name must be 1-64 of a-z, 0-9, '.', '_', '-', starting with a letter or digit",
                field="name",
            )
        if not self.base_model:
            raise InvalidArgument("base_model is required", field="base_model")
        if not self.source:
            raise InvalidArgument("source is required", field="source")
        if self.sha256 and not SHA256.match(self.sha256):
            raise InvalidArgument("sha256 must be 64 lower-case hex digits", field="sha256")
        if not 0.0 <= self.default_scale <= MAX_SCALE:
            raise InvalidArgument(
                f"default_scale must be in [0, {MAX_SCALE}]", field="default_scale"
            )
        if any(t not in TIER_NAMES for t in self.tiers):
            raise InvalidArgument(f"tiers must be among {TIER_NAMES}", field="tiers")


@dataclass(frozen=True)
class Adapter:
    """A record and where its verified artefact is."""

    record: AdapterRecord
    path: Path


@dataclass(frozen=True)
class Page:
    adapters: list[Adapter]
    next_page_token: str


def _token(name: str) -> str:
    return base64.urlsafe_b64encode(name.encode()).decode()


def _after(token: str) -> str:
    if not token:
        return ""
    try:
        return base64.b64decode(token.encode(), altchars=b"-_", validate=True).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError) as error:
        raise InvalidArgument(
            "page_token is not one this service issued", field="page_token"
        ) from error


class AdapterRegistry:
    def __init__(self, store: ArtefactStore, metadata: MetadataStore) -> None:
        self._store = store
        self._metadata = metadata
        # Register and delete decide together whether an artefact is still referenced.
        self._write = asyncio.Lock()

    async def open(self) -> None:
        await asyncio.to_thread(self._store.open)
        await self._metadata.open()

    async def close(self) -> None:
        await self._metadata.close()

    async def register(self, registration: Registration) -> Adapter:
        registration.validate()
        async with self._write:
            if await self._metadata.get(registration.name) is not None:
                raise AlreadyExists(f"adapter {registration.name!r} already exists", field="name")
            stored = await asyncio.to_thread(
                self._store.ingest, registration.source, registration.format, registration.sha256
            )
            record = AdapterRecord(
                name=registration.name,
                base_model=registration.base_model,
                format=registration.format,
                sha256=stored.sha256,
                source=registration.source,
                default_scale=registration.default_scale,
                size_bytes=stored.size_bytes,
                created_unix_ns=time.time_ns(),
                store_path=stored.store_path,
                tiers=registration.tiers,
            )
            try:
                await self._metadata.insert(record)
            except BaseException:
                # Another replica took the name; keep the artefact only if someone names it.
                if await self._metadata.count_sha256(stored.sha256) == 0:
                    await asyncio.to_thread(self._store.remove, stored.sha256)
                raise
        return Adapter(record, self._store.path_of(record.store_path))

    async def get(self, name: str) -> Adapter:
        """The adapter, its artefact re-hashed now: every load checks what it loads."""
        record = await self._metadata.get(name)
        if record is None:
            raise NotFound(f"adapter {name!r} is not registered", field="name")
        path = await asyncio.to_thread(self._store.verify, record.stored, record.format)
        return Adapter(record, path)

    async def list(self, base_model: str = "", page_size: int = 0, page_token: str = "") -> Page:
        limit = MAX_PAGE if page_size <= 0 else min(page_size, MAX_PAGE)
        records = await self._metadata.list(base_model, _after(page_token), limit + 1)
        more = len(records) > limit
        records = records[:limit]
        return Page(
            adapters=[Adapter(r, self._store.path_of(r.store_path)) for r in records],
            next_page_token=_token(records[-1].name) if more else "",
        )

    async def delete(self, name: str) -> AdapterRecord:
        async with self._write:
            record = await self._metadata.delete(name)
            if record is None:
                raise NotFound(f"adapter {name!r} is not registered", field="name")
            if await self._metadata.count_sha256(record.sha256) == 0:
                await asyncio.to_thread(self._store.remove, record.sha256)
        return record
