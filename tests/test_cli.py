"""The `slm` client commands, run as processes against the real mesh through Envoy."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from helpers import DEFAULT_MODEL, Mesh, free_port, to_toml

from inference_local.config import InferenceLocalConfig
from mesh.client import Answer, error_for, items, print_table
from mesh.settings import Settings
from slm import errors


def slm(
    *args: str, stdin: str = "", config: Path | None = None
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLM_")}
    prefix = ["--config", str(config)] if config else []
    return subprocess.run(
        [sys.executable, "-m", "mesh.cli", *prefix, *args],
        input=stdin,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


# --- the core, with plain inputs ---------------------------------------------------------------


def test_http_errors_become_slm_errors() -> None:
    request = httpx.Request("POST", "http://mesh/admin/models/load")
    body = {"error": {"message": "no such model", "type": "not_found_error"}}
    found = error_for(httpx.Response(404, json=body, request=request))
    assert isinstance(found, errors.NotFound)
    assert found.message == "no such model (HTTP 404)"
    missing = error_for(httpx.Response(404, json={"detail": "Not Found"}, request=request))
    assert missing.message == "this mesh has no POST /admin/models/load (HTTP 404)"
    busy = error_for(httpx.Response(429, text="slow down", request=request))
    assert isinstance(busy, errors.ResourceExhausted)
    assert isinstance(error_for(httpx.Response(502, request=request)), errors.Internal)


def test_lists_are_found_whatever_the_endpoint_calls_them() -> None:
    assert items({"data": [{"id": "a"}]}) == [{"id": "a"}]
    assert items({"models": [{"name": "b"}]}, "models") == [{"name": "b"}]
    assert items([{"x": 1}, "junk"]) == [{"x": 1}]
    assert items(None) == []


def test_table_and_figures() -> None:
    out = io.StringIO()
    print_table([{"id": "m1", "loaded": True}, {"id": "model-2", "loaded": False}], out, ["id"])
    assert out.getvalue().splitlines() == ["ID", "m1", "model-2"]
    answer = Answer(
        text="hi",
        finish_reason="stop",
        ttft_s=0.1,
        duration_s=1.1,
        completion_tokens=11,
        tier="local",
        masked_entities={"EMAIL_ADDRESS": 1},
    )
    figures = answer.figures()
    assert "tier A (local)" in figures
    assert "TTFT 100 ms" in figures
    assert "10.0 tokens/s" in figures
    assert "EMAIL_ADDRESS x1" in figures


def test_an_unreachable_mesh_is_one_line_and_exit_1() -> None:
    result = slm("models", "list", "--url", f"http://127.0.0.1:{free_port()}")
    assert result.returncode == 1
    assert result.stderr.startswith("slm: cannot reach")
    assert "Traceback" not in result.stderr


def test_assemble_shows_progress(tmp_path: Path) -> None:
    settings = Settings(inference_local=InferenceLocalConfig(models_dir=tmp_path / "models"))
    config = tmp_path / "slm.toml"
    config.write_text(to_toml(settings))
    result = slm("models", "assemble", config=config)
    assert result.returncode == 0, result.stderr
    assembled = tmp_path / "models" / InferenceLocalConfig().models[0].path
    assert result.stdout.strip() == f"{DEFAULT_MODEL}: {assembled}"
    assert f"assembling {DEFAULT_MODEL}" in result.stderr
    assert "100%" in result.stderr
    assert assembled.stat().st_size > 100 << 20


# --- against the whole mesh ----------------------------------------------------------------------


@pytest.mark.e2e
def test_models_list(mesh: Mesh) -> None:
    result = slm("models", "list", "--url", mesh.base_url)
    assert result.returncode == 0, result.stderr
    assert DEFAULT_MODEL in result.stdout


@pytest.mark.e2e
def test_chat_streams_answers_and_keeps_the_conversation(mesh: Mesh) -> None:
    result = slm(
        "chat",
        "--url",
        mesh.base_url,
        "--system",
        "You are terse.",
        "--max-tokens",
        "12",
        "--temperature",
        "0",
        stdin="Name three colours.\n\nAnd three animals?\n/exit\nnever sent\n",
    )
    assert result.returncode == 0, result.stderr
    figures = [line for line in result.stderr.splitlines() if line.startswith("[")]
    assert len(figures) == 2, result.stderr
    assert all("tier A (local)" in f and "TTFT" in f for f in figures)
    answers = [line for line in result.stdout.splitlines() if line.strip()]
    assert answers


@pytest.mark.e2e
def test_chat_with_an_unknown_model_fails_cleanly(mesh: Mesh) -> None:
    result = slm("chat", "--url", mesh.base_url, "--model", "no-such-model", stdin="Hi\n")
    assert result.returncode == 1
    assert result.stderr.startswith("slm: ")
    assert "(HTTP 404)" in result.stderr


@pytest.mark.e2e
def test_models_load_and_unload(mesh: Mesh) -> None:
    name = "gemma-copy"
    path = InferenceLocalConfig().models[0].path
    loaded = slm("models", "load", name, "--path", path, "--url", mesh.base_url)
    assert loaded.returncode == 0, loaded.stderr
    assert f"loading {name}: done" in loaded.stderr
    listed = slm("models", "list", "--url", mesh.base_url)
    assert name in listed.stdout
    unloaded = slm("models", "unload", name, "--url", mesh.base_url)
    assert unloaded.returncode == 0, unloaded.stderr


@pytest.mark.e2e
def test_models_apply_sends_the_config_files_manifest(mesh: Mesh, tmp_path: Path) -> None:
    """A dry run: the shared mesh keeps its manifest; the report says what would change."""
    config = tmp_path / "slm.toml"
    untiered = mesh.settings
    config.write_text(to_toml(untiered))
    refused = slm("models", "apply", "--dry-run", "--url", mesh.base_url, config=config)
    assert refused.returncode == 1
    assert f"{DEFAULT_MODEL!r} has no tier in the config file" in refused.stderr

    local = untiered.inference_local
    tiered = untiered.model_copy(
        update={
            "inference_local": local.model_copy(
                update={
                    "models": [
                        local.models[0].model_copy(update={"tier": "resident"}),
                        local.models[0].model_copy(
                            update={"name": "standby-twin", "tier": "standby", "package": None}
                        ),
                    ]
                }
            )
        }
    )
    config.write_text(to_toml(tiered))
    result = slm("models", "apply", "--dry-run", "--url", mesh.base_url, config=config)
    assert result.returncode == 0, result.stderr
    address = mesh.settings.inference_local.endpoint.address
    assert f"{address}: added standby-twin, changed {DEFAULT_MODEL}" in result.stdout
    assert "standby-twin  standby   mapped" in result.stdout
    listed = httpx.get(f"{mesh.base_url}/admin/models", timeout=30).json()
    assert "standby-twin" not in {m["id"] for m in listed["data"]}


@pytest.mark.e2e
def test_adapters_list(mesh: Mesh) -> None:
    result = slm("adapters", "list", "--url", mesh.base_url)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    missing = slm("adapters", "delete", "no-such-adapter", "--url", mesh.base_url)
    assert missing.returncode == 1
    assert "(HTTP 404)" in missing.stderr
