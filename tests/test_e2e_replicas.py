"""Two replicas of every hop under `slm up` (gateway, Doorman, inference-local): requests
spread over each hop's two, a model loaded through the admin API lands on both inference-local
replicas, and killing one replica of a hop leaves every new request served."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers import (
    DEFAULT_MODEL,
    Mesh,
    mesh_settings,
    metric_value,
    metrics_urls,
    replicated_port,
    wait_for,
    with_hop_replicas,
)

from slm.config import ServiceEndpoint

pytestmark = pytest.mark.e2e

FILE = "gemma-3-270m-q4_k_m.gguf"
TWIN = "gemma-twin"
SERVICE = "inference-local"
REPLICAS = 2


@pytest.fixture(scope="module")
def mesh2(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    """A small mesh whose gateway, Doorman and inference-local each run as two processes
    (inference-local with one thread each)."""
    state = tmp_path_factory.mktemp("mesh-replicas")
    settings = mesh_settings(state)
    port = replicated_port(REPLICAS)
    local = settings.inference_local
    local.endpoint = ServiceEndpoint(
        port=port, metrics_port=replicated_port(REPLICAS), replicas=REPLICAS
    )
    local.parallel = 2
    local.n_threads = 1
    # Callers name the first replica; `slm up` widens that to every replica's address.
    settings.doorman.inference_local = settings.gateway.inference_local = f"127.0.0.1:{port}"
    settings = with_hop_replicas(settings, REPLICAS)
    running = Mesh(settings, state / "slm.toml", state / "mesh.log")
    running.start()
    yield running
    code = running.stop()
    assert code == 0, running.log_tail()


def finished(mesh: Mesh, replica: int, model: str) -> float:
    """Generations replica `replica` has finished for `model`, from its own metrics port;
    0 while it is down (a restarted replica starts from 0)."""
    try:
        text = httpx.get(mesh.metrics_url(replica), timeout=5).text
    except httpx.TransportError:
        return 0.0
    return metric_value(text, "slm_engine_requests_total", model=model)


def counts(mesh: Mesh, model: str) -> list[float]:
    return [finished(mesh, k, model) for k in range(REPLICAS)]


def chat(mesh: Mesh, model: str) -> str:
    with mesh.openai_client() as client:
        reply = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "Say hello."}],
            max_tokens=2,
            temperature=0,
        )
        assert reply.choices[0].finish_reason in ("stop", "length")
        return reply.id


def complete(mesh: Mesh, model: str) -> None:
    """A raw-prompt completion: a model loaded by path has no chat template of its own."""
    with mesh.openai_client() as client:
        reply = client.completions.create(model=model, prompt="The sky is", max_tokens=2)
        assert reply.choices[0].finish_reason in ("stop", "length")


def serving(address: str) -> bool:
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=2
            )
        except grpc.RpcError:
            return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def test_requests_spread_over_both_replicas(mesh2: Mesh) -> None:
    before = counts(mesh2, DEFAULT_MODEL)
    for _ in range(20):
        chat(mesh2, DEFAULT_MODEL)

    # Each replica counts the generations it ran itself; the counter moves as a stream ends.
    def served() -> list[float]:
        return [now - then for now, then in zip(counts(mesh2, DEFAULT_MODEL), before, strict=True)]

    assert wait_for(lambda: sum(served()) == 20, timeout_s=30), served()
    assert all(n >= 1 for n in served()), served()


def test_a_model_loaded_through_the_admin_api_is_on_both_replicas(mesh2: Mesh) -> None:
    admin = f"{mesh2.base_url}/admin/models"
    loaded = httpx.post(
        f"{admin}/load",
        json={"name": TWIN, "path": FILE, "context_length": 256, "parallel": 2},
        timeout=300,
    )
    assert loaded.status_code == 200, loaded.text
    addresses = mesh2.settings.inference_local.endpoint.addresses
    assert [(r["address"], r["ok"]) for r in loaded.json()["replicas"]] == [
        (a, True) for a in addresses
    ]

    listing = httpx.get(admin, timeout=30).json()
    assert [r["address"] for r in listing["replicas"]] == addresses
    twin = {m["id"]: m for m in listing["data"]}[TWIN]
    assert twin["loaded"] is True
    assert [(r["address"], r["loaded"], r["state"]) for r in twin["replicas"]] == [
        (a, True, "ready") for a in addresses
    ]
    # Each replica holds a copy: weights, KV and compute of its own.
    assert all(r["memory_bytes"] > 200 << 20 for r in twin["replicas"])

    before = counts(mesh2, TWIN)
    for _ in range(6):
        complete(mesh2, TWIN)

    def served() -> list[float]:
        return [now - then for now, then in zip(counts(mesh2, TWIN), before, strict=True)]

    assert wait_for(lambda: sum(served()) == 6, timeout_s=30), served()
    # Held by both, so balanced over both.
    assert all(n >= 1 for n in served()), served()


def test_killing_one_replica_leaves_every_request_served(mesh2: Mesh) -> None:
    survivor_before = finished(mesh2, 0, DEFAULT_MODEL)
    victim = mesh2.pid_of(SERVICE, 1)
    os.kill(victim, signal.SIGKILL)
    # Right after the kill, before anything could notice it: every request must still be
    # answered (the supervisor restarts the replica only after a backoff, and its model load).
    for _ in range(8):
        chat(mesh2, DEFAULT_MODEL)

    def accounted() -> float:
        # The survivor ran them, save any the restarted replica (counting from 0) took.
        return (finished(mesh2, 0, DEFAULT_MODEL) - survivor_before) + finished(
            mesh2, 1, DEFAULT_MODEL
        )

    assert wait_for(lambda: accounted() == 8, timeout_s=30), accounted()
    # The supervisor brings the killed replica back as a new process.
    address = mesh2.settings.inference_local.endpoint.addresses[1]
    assert wait_for(lambda: serving(address), timeout_s=180), mesh2.log_tail()
    assert mesh2.pid_of(SERVICE, 1) != victim


def hop_counts(mesh: Mesh, hop: str) -> list[float]:
    """Chat completions each replica of the gateway or the Doorman has answered, from its own
    metrics; 0 while it is down."""
    if hop == "gateway":
        name, labels = "slm_gateway_requests_total", {"route": "/v1/chat/completions"}
    else:
        name, labels = "slm_doorman_requests_total", {}
    found = []
    for url in metrics_urls(mesh.settings)[hop]:
        try:
            found.append(metric_value(httpx.get(url, timeout=5).text, name, **labels))
        except httpx.TransportError:
            found.append(0.0)
    return found


@pytest.mark.parametrize("hop", ["gateway", "doorman"])
def test_requests_spread_over_both_replicas_of_each_hop(mesh2: Mesh, hop: str) -> None:
    before = hop_counts(mesh2, hop)
    for _ in range(12):
        chat(mesh2, DEFAULT_MODEL)

    def served() -> list[float]:
        return [now - then for now, then in zip(hop_counts(mesh2, hop), before, strict=True)]

    assert wait_for(lambda: sum(served()) == 12, timeout_s=30), served()
    assert all(n >= 1 for n in served()), served()


@pytest.mark.parametrize("hop", ["gateway", "doorman"])
def test_killing_one_replica_of_a_hop_leaves_every_request_served(mesh2: Mesh, hop: str) -> None:
    victim = mesh2.pid_of(hop, 1)
    os.kill(victim, signal.SIGKILL)
    # Right after the kill: Envoy, the gateways' channels and the health checks have not yet
    # noticed, and every request must still be answered.
    for _ in range(8):
        chat(mesh2, DEFAULT_MODEL)

    # The supervisor brings the killed replica back as a new process.
    def restarted() -> bool:
        try:
            return mesh2.pid_of(hop, 1) != victim
        except LookupError:  # between the kill and the restart
            return False

    assert wait_for(restarted, timeout_s=60), mesh2.log_tail()
