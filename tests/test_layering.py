"""The package layering: slm is a library that imports no service, services import no other
service and never the composition root (mesh), which alone assembles them."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SERVICES = (
    "adapters",
    "doorman",
    "gateway",
    "inference_local",
    "inference_remote",
    "kvcache",
    "ledger",
)


def package_dir(name: str) -> Path:
    return ROOT / name if name == "gateway" else ROOT / "services" / name


def imports(package: str) -> dict[str, set[str]]:
    """Module path -> the top-level packages it imports (at any depth, lazily or not)."""
    found: dict[str, set[str]] = {}
    for path in sorted(package_dir(package).rglob("*.py")):
        if "v1" in path.relative_to(package_dir(package)).parts:
            continue  # generated stubs
        tree = ast.parse(path.read_text(), str(path))
        names: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
        found[str(path.relative_to(ROOT))] = names
    return found


def test_the_walk_sees_imports() -> None:
    # The check below would pass vacuously if the walk found nothing.
    assert "mesh" in imports("mesh")["services/mesh/cli.py"]
    assert "doorman" in set().union(*imports("mesh").values())


def test_common_package_imports_no_service() -> None:
    offenders = {
        module: sorted(names & {*SERVICES, "mesh"})
        for module, names in imports("slm").items()
        if names & {*SERVICES, "mesh"}
    }
    assert offenders == {}


def test_services_import_neither_each_other_nor_the_composition_root() -> None:
    offenders = {
        module: sorted(names & ({*SERVICES, "mesh"} - {service}))
        for service in SERVICES
        for module, names in imports(service).items()
        if names & ({*SERVICES, "mesh"} - {service})
    }
    assert offenders == {}


def test_the_service_list_exists_once() -> None:
    from mesh.services import SERVICES as TABLE

    names = [service.name for service in TABLE]
    assert len(names) == len(set(names))
    # Nothing else spells the list: no module outside the table names every service.
    spelled = [
        path
        for path in (ROOT / "services").rglob("*.py")
        if path.name != "services.py"
        and all(f'"{name}"' in path.read_text() for name in ("ledger", "doorman", "kv-cache"))
    ]
    assert spelled == []
