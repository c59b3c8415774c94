"""Fixtures: the real default model, and real gRPC servers on port 0."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

sys.path.insert(0, str(Path(__file__).parent))

from helpers import (
    OPEN_RUNTIMES,
    Mesh,
    default_model_file,
    free_port,
    mesh_settings,
    runtime,
)
from postgres_server import PostgresServer, postgres_bindir

from mesh.settings import Settings
from slm.config import ServiceEndpoint
from slm.server import GrpcService

# Tests must never pick up a developer's config file.
os.environ.pop("SLM_CONFIG", None)


@pytest.fixture(scope="session")
def model_path() -> Path:
    return default_model_file()


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return mesh_settings(tmp_path)


def port0(endpoint: ServiceEndpoint) -> ServiceEndpoint:
    return ServiceEndpoint(host="127.0.0.1", port=0, metrics_port=0)


@pytest.fixture(autouse=True)
def _close_runtimes() -> Iterator[None]:
    """Closes the Runtimes (their channels) that the test and its function fixtures made, on
    the loop that made them, which no longer runs once they are torn down. A plain fixture, so
    that tests of synchronous APIs that refuse a running loop (Playwright's) can use it too."""
    made_before = len(OPEN_RUNTIMES)
    yield
    while len(OPEN_RUNTIMES) > made_before:
        made, loop = OPEN_RUNTIMES.pop()
        loop.run_until_complete(made.close())


@pytest.fixture(scope="session")
async def inference_server(
    model_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[GrpcService]:
    """inference-local with the real default model, shared by the tests of a session."""
    from inference_local.app import build_app

    settings = mesh_settings(tmp_path_factory.mktemp("inference"))
    registry = CollectorRegistry()
    app = build_app(settings.inference_local, runtime(settings, registry))
    endpoint = port0(settings.inference_local.endpoint)
    async with GrpcService("inference-local", app, endpoint, settings.telemetry, registry) as svc:
        yield svc


@pytest.fixture
async def ledger_server(tmp_path: Path) -> AsyncIterator[GrpcService]:
    from ledger.app import build_app

    settings = mesh_settings(tmp_path)
    registry = CollectorRegistry()
    app = build_app(settings.ledger, runtime(settings, registry))
    async with GrpcService(
        "ledger", app, port0(settings.ledger.endpoint), settings.telemetry, registry
    ) as svc:
        yield svc


@pytest.fixture(scope="session")
def mesh(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    """The whole mesh as processes, shared by the end-to-end tests of a session."""
    state = tmp_path_factory.mktemp("mesh")
    running = Mesh(mesh_settings(state), state / "slm.toml", state / "mesh.log")
    running.start()
    yield running
    code = running.stop()
    assert code == 0, running.log_tail()


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real redis-server on a free loopback port (`make deps` installs it)."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed: run `make deps`")
    port = free_port()
    workdir = tmp_path_factory.mktemp("redis")
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        cwd=workdir,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    assert process.stdout is not None
    for line in process.stdout:
        if b"Ready to accept connections" in line:
            break
    else:
        pytest.fail(f"redis-server exited with {process.wait()}")
    yield f"redis://127.0.0.1:{port}/0"
    process.terminate()
    process.wait(timeout=30)
    process.stdout.close()


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """A real PostgreSQL server for the session (installed by `make deps`)."""
    if postgres_bindir() is None:
        pytest.skip("PostgreSQL is not installed: run `make deps`")
    server = PostgresServer()
    server.start()
    yield server
    server.stop()
