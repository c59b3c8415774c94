"""SIGHUP: `slm serve inference-local` reads its config file again and applies the model
manifest in it (a broken file changes nothing); `slm up` passes a SIGHUP on to it."""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from helpers import SHARED_MODELS_DIR, ServedProcess, free_port, to_toml, until

from inference_local.config import InferenceLocalConfig, ModelConfig
from mesh.settings import Settings
from mesh.supervisor import Supervisor
from slm.config import ServiceEndpoint
from slm.v1 import inference_pb2, inference_pb2_grpc, types_pb2

FILE = "gemma-3-270m-q4_k_m.gguf"


def settings_with(
    port: int, metrics_port: int, models: list[ModelConfig], **fields: object
) -> Settings:
    return Settings(
        inference_local=InferenceLocalConfig(
            endpoint=ServiceEndpoint(port=port, metrics_port=metrics_port),
            models_dir=SHARED_MODELS_DIR,
            models=models,
            parallel=2,
            adapter_registry="",
            **fields,
        )
    )


def model(name: str, tier: str, **fields: object) -> ModelConfig:
    values: dict[str, object] = {"tier": tier, **fields}
    return ModelConfig(name=name, path=FILE, context_length=256, **values)


@pytest.fixture
def served(model_path: Path, tmp_path: Path) -> Iterator[tuple[ServedProcess, Settings]]:
    settings = settings_with(free_port(), free_port(), [model("first", "resident")])
    process = ServedProcess("inference-local", tmp_path, lambda: to_toml(settings))
    process.start()
    yield process, settings
    process.stop()


async def listing(address: str) -> dict[str, tuple[int, int]]:
    async with grpc.aio.insecure_channel(address) as channel:
        reply = await inference_pb2_grpc.InferenceServiceStub(channel).ListModels(
            inference_pb2.ListModelsRequest(), timeout=30
        )
    return {m.name: (m.tier, m.state) for m in reply.models}


async def test_sighup_applies_the_manifest_of_the_config_file(
    served: tuple[ServedProcess, Settings],
) -> None:
    process, settings = served
    await process.wait_serving()
    assert process.process is not None
    address = settings.inference_local.endpoint.address
    assert await listing(address) == {
        "first": (types_pb2.MODEL_TIER_RESIDENT, types_pb2.MODEL_STATE_READY)
    }

    # A file that does not validate changes nothing, and the process stays up.
    process.config_path.write_text(to_toml(settings).replace('tier = "resident"', 'tier = "x"'))
    process.process.send_signal(signal.SIGHUP)
    await until(lambda: "the config file cannot be read" in process.log.read_text())
    assert await listing(address) == {
        "first": (types_pb2.MODEL_TIER_RESIDENT, types_pb2.MODEL_STATE_READY)
    }

    new = settings_with(
        settings.inference_local.endpoint.port,
        settings.inference_local.endpoint.metrics_port,
        [model("first", "resident"), model("second", "standby", co_activation=["first"])],
        batch_invariant=True,
    )
    process.config_path.write_text(to_toml(new))
    process.process.send_signal(signal.SIGHUP)
    await until(lambda: "SIGHUP: manifest reloaded" in process.log.read_text())
    # A setting outside the manifest is named, not taken in silence.
    [warning] = [
        line
        for line in process.log.read_text().splitlines()
        if "take effect at the next start" in line
    ]
    assert "batch_invariant" in warning
    assert await listing(address) == {
        "first": (types_pb2.MODEL_TIER_RESIDENT, types_pb2.MODEL_STATE_READY),
        "second": (types_pb2.MODEL_TIER_STANDBY, types_pb2.MODEL_STATE_MAPPED),
    }
    assert process.process.poll() is None


# A child that reports a SIGHUP in a file and exits; "ready" once its handler is in place.
HANGUP_CHILD = """
import signal, sys, time
def hup(*_):
    open(sys.argv[1], "w").write("hup")
    sys.exit(0)
signal.signal(signal.SIGHUP, hup)
print("ready", flush=True)
time.sleep(120)
"""


async def test_slm_up_passes_sighup_on_to_the_services_that_reload(tmp_path: Path) -> None:
    supervisor = Supervisor(Settings(), None)
    by_name = {(c.name, c.replica): c for c in supervisor.children}
    children = [by_name[("inference-local", 0)], by_name[("doorman", 0)]]
    for child in children:
        child.process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            HANGUP_CHILD,
            str(tmp_path / child.name),
            stdout=asyncio.subprocess.PIPE,
        )
        assert child.process.stdout is not None
        assert await child.process.stdout.readline() == b"ready\n"
    try:
        supervisor.hangup()
        inference, doorman = (c.process for c in children)
        assert inference is not None
        assert doorman is not None
        assert await inference.wait() == 0
        assert (tmp_path / "inference-local").read_text() == "hup"
        # The Doorman has nothing to reload: it is left alone.
        assert doorman.returncode is None
        assert not (tmp_path / "doorman").exists()
    finally:
        for child in children:
            if child.process is not None and child.process.returncode is None:
                child.process.kill()
                await child.process.wait()
