"""Every script in examples/ runs against the real mesh and prints what it promises."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import DEFAULT_MODEL, Mesh

pytestmark = pytest.mark.e2e

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run_example(mesh: Mesh, *command: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "SLM_URL": mesh.base_url,
        "SLM_GRPC_TARGET": mesh.grpc_target,
        "SLM_MODEL": DEFAULT_MODEL,
    }
    env.pop("SLM_API_KEY", None)
    result = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def test_curl_snippets(mesh: Mesh) -> None:
    if shutil.which("curl") is None:
        pytest.fail("curl is missing: `make test` installs it")
    out = run_example(mesh, "bash", str(EXAMPLES / "curl.sh")).stdout
    assert DEFAULT_MODEL in out.split("== chat")[0]
    assert '"object":"chat.completion"' in out
    streamed = out.split("== chat, streamed")[1].split("== completion")[0]
    assert '"object":"chat.completion.chunk"' in streamed
    assert streamed.rstrip().endswith("data: [DONE]")
    assert '"object":"text_completion"' in out.split("== completion")[1]


def test_openai_client(mesh: Mesh) -> None:
    out = run_example(mesh, sys.executable, str(EXAMPLES / "openai_client.py")).stdout
    lines = out.splitlines()
    assert DEFAULT_MODEL in lines[0]
    answer = next(line for line in lines if line.startswith("answer:"))
    assert answer.removeprefix("answer:").strip()
    assert "stream usage:" in out
    assert "served by tier local" in out


def test_grpc_client(mesh: Mesh) -> None:
    out = run_example(mesh, sys.executable, str(EXAMPLES / "grpc_client.py")).stdout
    assert DEFAULT_MODEL in out.splitlines()[0]
    assert "finish: FINISH_REASON_" in out
    assert "tier: TIER_LOCAL" in out


def test_websocket_client(mesh: Mesh) -> None:
    out = run_example(mesh, sys.executable, str(EXAMPLES / "websocket_client.py")).stdout
    assert out.startswith("answer: ")
    assert "tokens:" in out
    assert "tier: local" in out
