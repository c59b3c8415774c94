"""Faults under load: every process of the mesh is SIGKILLed in turn while clients keep asking.

Each process comes back within RECOVERY_S (the supervisor restarts it; callers reconnect), no
request hangs past its deadline, every request that was answered has its ledger record, and the
hash chain verifies. The same holds for a ledger on PostgreSQL whose server is killed and
restarted. RECOVERY_S is a hang detector, not a performance claim: recovery is usually a few
seconds (the supervisor's first backoff is 1 s, then the process starts).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import httpx
import pytest
from helpers import DEFAULT_MODEL, Mesh, _children, mesh_settings
from postgres_server import PostgresServer

from slm.v1 import ledger_pb2, ledger_pb2_grpc

RECOVERY_S = 120.0
# A client's own deadline: a request still unanswered after it has hung.
DEADLINE_S = 60.0
WORKERS = 3
# A refused client waits this long before it asks again, as clients back off: pacing the load,
# not waiting for anything (nothing in the test depends on it).
BACKOFF_S = 0.05
VICTIMS = ("inference-local", "doorman", "ledger", "gateway", "envoy")


@dataclass
class Load:
    """Clients asking for short chat completions until stopped; what happened to each."""

    url: str
    answered: list[str] = field(default_factory=list)
    refused: list[int] = field(default_factory=list)
    hung: list[str] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def until_answered(self, count: int) -> None:
        """Wait until `count` requests have been answered in all (within RECOVERY_S)."""
        async with asyncio.timeout(RECOVERY_S), self.changed:
            await self.changed.wait_for(lambda: len(self.answered) >= count)

    async def worker(self) -> None:
        async with httpx.AsyncClient(timeout=DEADLINE_S) as client:
            while not self.stop.is_set():
                request_id = uuid.uuid4().hex
                try:
                    response = await client.post(
                        f"{self.url}/v1/chat/completions",
                        headers={"x-request-id": request_id},
                        json={
                            "model": DEFAULT_MODEL,
                            "messages": [{"role": "user", "content": "Say hi."}],
                            "max_tokens": 3,
                        },
                    )
                except httpx.TimeoutException:
                    self.hung.append(request_id)
                    continue
                except httpx.TransportError:
                    # The edge itself was down: a refusal the client sees at once.
                    self.refused.append(0)
                    await asyncio.sleep(BACKOFF_S)
                    continue
                if response.status_code == 200:
                    assert response.json()["choices"][0]["finish_reason"]
                    self.answered.append(request_id)
                    async with self.changed:
                        self.changed.notify_all()
                else:
                    self.refused.append(response.status_code)
                    await asyncio.sleep(BACKOFF_S)


def pid_of(mesh: Mesh, name: str) -> int:
    if name != "envoy":
        return mesh.pid_of(name)
    assert mesh.process is not None
    for pid in _children(mesh.process.pid):
        with contextlib.suppress(OSError):
            if "envoy" in os.readlink(f"/proc/{pid}/exe"):
                return pid
    raise LookupError("no envoy process")


async def served(url: str) -> bool:
    async with httpx.AsyncClient(timeout=10) as client:
        try:
            response = await client.post(
                f"{url}/v1/completions",
                json={"model": DEFAULT_MODEL, "prompt": "Hi", "max_tokens": 1},
            )
        except httpx.HTTPError:
            return False
    return response.status_code == 200


async def kill_and_recover(mesh: Mesh, name: str) -> float:
    """SIGKILL the process serving `name`; seconds until a new one serves requests again."""
    old = pid_of(mesh, name)
    os.kill(old, signal.SIGKILL)
    killed = time.monotonic()
    async with asyncio.timeout(RECOVERY_S):
        while True:
            with contextlib.suppress(LookupError):
                if pid_of(mesh, name) != old and await served(mesh.base_url):
                    return time.monotonic() - killed
            await asyncio.sleep(0.1)


async def recorded(mesh: Mesh, answered: list[str]) -> tuple[list[str], bool]:
    """The answered requests the ledger lacks once records spooled while a process was down
    have been replayed (waited for, within RECOVERY_S), and whether the chain verifies."""
    async with asyncio.timeout(RECOVERY_S):
        while True:
            ids, verified = await ledger_request_ids(mesh)
            missing = [request_id for request_id in answered if request_id not in ids]
            if not missing:
                return missing, verified
            await asyncio.sleep(0.5)


async def ledger_request_ids(mesh: Mesh) -> tuple[set[str], bool]:
    """Every request id in the ledger, and whether its chain verifies."""
    ids: set[str] = set()
    async with grpc.aio.insecure_channel(mesh.settings.ledger.endpoint.address) as channel:
        stub = ledger_pb2_grpc.LedgerServiceStub(channel)
        token = ""
        while True:
            page = await stub.List(
                ledger_pb2.ListRequest(page_size=1000, page_token=token), timeout=60
            )
            ids |= {record.entry.request_id for record in page.records}
            token = page.next_page_token
            if not token:
                break
        verdict = await stub.Verify(ledger_pb2.VerifyRequest(), timeout=120)
    return ids, verdict.intact


async def under_load(mesh: Mesh, faults: list[str]) -> tuple[Load, dict[str, float]]:
    load = Load(mesh.base_url)
    workers = [asyncio.create_task(load.worker()) for _ in range(WORKERS)]
    recovery: dict[str, float] = {}
    try:
        await load.until_answered(3)  # the load is flowing before the first kill
        for name in faults:
            recovery[name] = await kill_and_recover(mesh, name)
            await load.until_answered(len(load.answered) + 3)  # flowing again under load
    finally:
        load.stop.set()
        await asyncio.gather(*workers)
    return load, recovery


@pytest.fixture
def fault_mesh(model_path: Path, tmp_path: Path) -> Iterator[Mesh]:
    settings = mesh_settings(tmp_path)
    settings.inference_local.parallel = 4
    mesh = Mesh(settings, tmp_path / "slm.toml", tmp_path / "mesh.log")
    mesh.start()
    yield mesh
    mesh.stop()


async def test_every_process_killed_in_turn_under_load(fault_mesh: Mesh) -> None:
    load, recovery = await under_load(fault_mesh, list(VICTIMS))
    missing, verified = await recorded(fault_mesh, load.answered)
    assert set(recovery) == set(VICTIMS)
    assert load.hung == []
    assert missing == []
    assert verified
    print(f"\nrecovery s: { {k: round(v, 1) for k, v in recovery.items()} }")
    print(f"answered {len(load.answered)}, refused {len(load.refused)}")


async def test_a_postgresql_ledger_whose_server_is_killed(
    model_path: Path, tmp_path: Path, postgres: PostgresServer
) -> None:
    settings = mesh_settings(tmp_path)
    settings.inference_local.parallel = 4
    settings.ledger.backend = "postgresql"
    settings.ledger.postgres_dsn = await postgres.new_database()
    mesh = Mesh(settings, tmp_path / "slm.toml", tmp_path / "mesh.log")
    mesh.start()
    try:
        load = Load(mesh.base_url)
        workers = [asyncio.create_task(load.worker()) for _ in range(WORKERS)]
        try:
            await load.until_answered(3)
            await asyncio.to_thread(postgres.kill)
            answered = len(load.answered)
            await asyncio.to_thread(postgres.restart)
            await load.until_answered(answered + 3)
        finally:
            load.stop.set()
            await asyncio.gather(*workers)
        missing, verified = await recorded(mesh, load.answered)
    finally:
        mesh.stop()
    assert load.hung == []
    assert missing == []
    assert verified
