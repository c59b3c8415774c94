"""Content-addressed artefact store: one directory per SHA-256, re-hashed on every load."""

from __future__ import annotations

import enum
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

import httpx

from slm.errors import Internal, InvalidArgument

GGUF_MAGIC = b"GGUF"
GGUF_FILE = "adapter.gguf"
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
CHUNK = 1 << 20


class Format(enum.Enum):
    GGUF = "gguf"
    PEFT = "peft"


@dataclass(frozen=True)
class Stored:
    """An artefact in the store."""

    sha256: str
    size_bytes: int
    # Relative to the store root: "<sha256>/adapter.gguf" or "<sha256>" (a PEFT directory).
    store_path: str


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _tree_files(root: Path) -> Iterator[Path]:
    for path in sorted(root.rglob("*")):
        if path.is_symlink():
            raise InvalidArgument(
                f"{path.name}: links are not allowed in an adapter", field="source"
            )
        if path.is_file():
            yield path


def tree_sha256(root: Path) -> str:
    """The checksum of a PEFT directory: its files' relative paths and checksums, in order."""
    digest = hashlib.sha256()
    for path in _tree_files(root):
        relative = path.relative_to(root).as_posix()
        digest.update(f"{relative}\0{_file_sha256(path)}\n".encode())
    return digest.hexdigest()


def _checksum(path: Path, fmt: Format) -> str:
    if fmt is Format.GGUF:
        return _file_sha256(path)
    if not path.is_dir():
        raise FileNotFoundError(path)
    return tree_sha256(path)


class ArtefactStore:
    """Artefacts under `root/<sha256>/`; blocking, so callers run it in a worker thread."""

    def __init__(self, root: Path, source_dirs: list[Path], max_bytes: int) -> None:
        self.root = root
        self._source_dirs = [d.expanduser().resolve() for d in source_dirs]
        self._max_bytes = max_bytes

    def open(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)

    def path_of(self, store_path: str) -> Path:
        return self.root / store_path

    def ingest(self, source: str, fmt: Format, expected_sha256: str) -> Stored:
        """Copy `source` into the store and return where it landed.

        The copy is hashed, not the source, so what is stored is what was checked. An artefact
        already in the store under the same checksum is reused.
        """
        staging = Path(tempfile.mkdtemp(prefix=".ingest-", dir=self.root))
        # The payload becomes <root>/<sha256> by one rename, so a reader never sees half of it.
        payload = staging / "payload"
        try:
            if fmt is Format.GGUF:
                payload.mkdir()
                self._fetch_file(source, payload / GGUF_FILE)
                _check_gguf(payload / GGUF_FILE)
                sha256 = _file_sha256(payload / GGUF_FILE)
                size = (payload / GGUF_FILE).stat().st_size
                store_path = f"{sha256}/{GGUF_FILE}"
            else:
                self._copy_tree(self._local_source(source), payload)
                sha256 = tree_sha256(payload)
                size = _tree_size(payload)
                store_path = sha256
            if expected_sha256 and expected_sha256 != sha256:
                raise InvalidArgument(
                    f"sha256 mismatch: expected {expected_sha256}, the source has {sha256}",
                    field="sha256",
                )
            final = self.root / sha256
            if not final.exists():
                try:
                    os.rename(payload, final)
                except OSError:
                    # Another registration of the same bytes won the race; theirs is as good.
                    if not final.exists():
                        raise
            return Stored(sha256=sha256, size_bytes=size, store_path=store_path)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def verify(self, stored: Stored, fmt: Format) -> Path:
        """The artefact's path, after re-hashing it; INTERNAL when it was altered or lost."""
        path = self.path_of(stored.store_path)
        try:
            actual = _checksum(path, fmt)
        except (OSError, InvalidArgument) as error:
            raise Internal(
                f"adapter artefact {stored.sha256} is unreadable: {error}",
                reason="ADAPTER_CHECKSUM_MISMATCH",
            ) from error
        if actual != stored.sha256:
            raise Internal(
                f"adapter artefact {stored.sha256} fails its checksum (now {actual})",
                reason="ADAPTER_CHECKSUM_MISMATCH",
            )
        return path

    def remove(self, sha256: str) -> None:
        shutil.rmtree(self.root / sha256, ignore_errors=True)

    def _local_source(self, source: str) -> Path:
        parts = urlsplit(source)
        if parts.scheme == "file":
            path = Path(unquote(parts.path))
        elif parts.scheme == "":
            path = Path(source)
        else:
            raise InvalidArgument(
                f"source scheme {parts.scheme!r}: a PEFT adapter is a local directory",
                field="source",
            )
        path = path.expanduser().resolve()
        if self._source_dirs and not any(path.is_relative_to(d) for d in self._source_dirs):
            raise InvalidArgument(
                f"source {path} is outside the allowed source directories", field="source"
            )
        return path

    def _fetch_file(self, source: str, target: Path) -> None:
        scheme = urlsplit(source).scheme
        if scheme in ("http", "https"):
            self._download(source, target)
            return
        path = self._local_source(source)
        if not path.is_file():
            raise InvalidArgument(f"source {path} is not a readable file", field="source")
        if path.stat().st_size > self._max_bytes:
            raise InvalidArgument(
                f"source is {path.stat().st_size} bytes, over the {self._max_bytes} limit",
                field="source",
            )
        shutil.copyfile(path, target)

    def _download(self, url: str, target: Path) -> None:
        size = 0
        try:
            with httpx.stream("GET", url, timeout=30, follow_redirects=True) as response:
                if response.status_code != 200:
                    raise InvalidArgument(
                        f"source answered HTTP {response.status_code}", field="source"
                    )
                with target.open("wb") as out:
                    for chunk in response.iter_bytes(CHUNK):
                        size += len(chunk)
                        if size > self._max_bytes:
                            raise InvalidArgument(
                                f"source is over the {self._max_bytes}-byte limit", field="source"
                            )
                        out.write(chunk)
        except httpx.HTTPError as error:
            raise InvalidArgument(f"source cannot be fetched: {error}", field="source") from error

    def _copy_tree(self, source: Path, target: Path) -> None:
        if not source.is_dir():
            raise InvalidArgument(f"source {source} is not a directory", field="source")
        if not (source / PEFT_CONFIG).is_file() or not any(
            (source / w).is_file() for w in PEFT_WEIGHTS
        ):
            raise InvalidArgument(
                f"source {source} is not a PEFT adapter: it needs {PEFT_CONFIG} and one of "
                f"{', '.join(PEFT_WEIGHTS)}",
                field="source",
            )
        if _tree_size(source) > self._max_bytes:
            raise InvalidArgument(
                f"source is over the {self._max_bytes}-byte limit", field="source"
            )
        shutil.copytree(source, target, symlinks=True)


def _tree_size(root: Path) -> int:
    return sum(p.stat().st_size for p in _tree_files(root))


def _check_gguf(path: Path) -> None:
    with path.open("rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise InvalidArgument("source is not a GGUF file", field="source")
