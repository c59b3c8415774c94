"""Fuzzing of the HTTP API through Envoy with schemathesis, from the mesh's own OpenAPI document.

A mesh of its own (`slm up`) serves /openapi.json through Envoy; schemathesis runs its examples,
coverage, fuzzing and stateful phases over every operation in it (OpenAI, Responses, Anthropic
Messages, /admin), with a fixed seed, so a run is reproducible. Any 5xx, a status or a body the
document does not declare, a request the document calls invalid that the server accepts, or a
Python traceback in the mesh's log fails the test.

Generations stay cheap: the document's examples ask for a few tokens, and a hook
(fuzz_http_hooks.py) makes every valid max_tokens at most 4 before the request goes out.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import Mesh, mesh_settings
from lora_fixture import make_lora_gguf

pytestmark = pytest.mark.e2e

SEED = 22
# Per operation and phase; with the coverage phase's own cases, several thousand in all.
MAX_EXAMPLES = 60
STATEFUL_STEPS = 6
MIN_CASES = 3000
ADAPTER = "support-tone.gguf"
EMBEDDINGS_MODEL = "gemma-3-270m-embed"
# A generation may run past a fuzzed timeout; every other answer comes at once.
REQUEST_TIMEOUT_S = 60
CHECKS = (
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_schema_conformance",
    "response_headers_conformance",
    "negative_data_rejection",
    "use_after_free",
    "ensure_resource_availability",
)


@pytest.fixture(scope="module")
def fuzz_mesh(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    state = tmp_path_factory.mktemp("fuzz-http-mesh")
    settings = mesh_settings(state)
    # The default model again, serving embeddings, so /v1/embeddings has a model to answer.
    generation = settings.inference_local.models[0]
    embeddings = generation.model_copy(
        update={"name": EMBEDDINGS_MODEL, "embeddings": True, "preload": False}
    )
    settings.inference_local.models = [generation, embeddings]
    sources = state / "sources"
    sources.mkdir()
    # A real LoRA adapter the registry may read, so the stateful phase can register one and
    # follow the document's links to GET and DELETE it.
    make_lora_gguf(model_path, sources / ADAPTER)
    settings.adapters.source_dirs = [sources]
    mesh = Mesh(settings, state / "slm.toml", state / "mesh.log")
    mesh.start()
    yield mesh
    mesh.stop()


def body_examples(document: dict[str, Any], path: str) -> list[dict[str, Any]]:
    body = document["paths"][path]["post"]["requestBody"]["content"]["application/json"]
    examples: list[dict[str, Any]] = body["schema"]["examples"]
    return examples


def document_for(mesh: Mesh) -> dict[str, Any]:
    """The mesh's document, its examples naming what this mesh has: the adapter file the
    registry may read, and the model that serves embeddings."""
    document: dict[str, Any] = httpx.get(f"{mesh.base_url}/openapi.json", timeout=30).json()
    sources = mesh.settings.adapters.source_dirs[0]
    for example in body_examples(document, "/admin/adapters"):
        example["source"] = str(sources / example["source"])
    for example in body_examples(document, "/v1/embeddings"):
        example["model"] = EMBEDDINGS_MODEL
    return document


def config_toml() -> str:
    checks = "\n".join(f"[checks.{name}]\nenabled = true" for name in CHECKS)
    return f"""
seed = {SEED}
request-timeout = {REQUEST_TIMEOUT_S}
# One request at a time: the run is the same every time (with two, which requests overlap
# depends on timing, e.g. a generation and an unload of its model).
workers = 1
hooks = "fuzz_http_hooks"

[generation]
max-examples = {MAX_EXAMPLES}
deterministic = true
database = "none"

[phases.examples]
enabled = true
[phases.coverage]
enabled = true
[phases.fuzzing]
enabled = true
[phases.stateful]
enabled = true
max-steps = {STATEFUL_STEPS}

[checks]
enabled = false
{checks}
"""


# About 3 minutes on 2 cores; the margin is for a machine busy with other work.
@pytest.mark.timeout(600)
def test_every_operation_survives_schemathesis(fuzz_mesh: Mesh, tmp_path: Path) -> None:
    schema = tmp_path / "openapi.json"
    schema.write_text(json.dumps(document_for(fuzz_mesh)))
    config = tmp_path / "schemathesis.toml"
    config.write_text(config_toml())
    report = tmp_path / "report.json"
    command = [
        str(Path(sys.executable).parent / "schemathesis"),
        "--config-file",
        str(config),
        "--no-color",
        "run",
        str(schema),
        "--url",
        fuzz_mesh.base_url,
        "--report",
        "json",
        "--report-json-path",
        str(report),
    ]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    run = subprocess.run(
        command, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=570
    )
    output = run.stdout + run.stderr
    print(output[-6000:])  # the summary: cases, phases, failures (pytest -s, or on failure)
    assert run.returncode == 0, output[-20000:]
    summary = json.loads(report.read_text())
    cases = summary["test_cases"]["generated"]
    assert cases >= MIN_CASES, f"only {cases} cases ran"
    assert summary["operations"]["tested"] == summary["operations"]["total"], summary["operations"]
    assert all(p["status"] != "skip" or p["skip_reason"] for p in summary["phases"].values())
    assert fuzz_mesh.process is not None
    assert fuzz_mesh.process.poll() is None


def test_no_traceback_in_the_fuzzed_mesh(fuzz_mesh: Mesh) -> None:
    # Runs after the fuzz run (pytest keeps file order): the mesh's log holds every service's.
    log = fuzz_mesh.log_path.read_text(errors="replace")
    assert "Traceback" not in log, log[log.find("Traceback") - 2000 :][:6000]
    assert "child exited" not in log
