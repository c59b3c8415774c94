"""`slm up`: starts every process of the mesh, waits for health, restarts crashes, stops cleanly."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import logging
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import httpx
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mesh.services import BY_NAME, REPLICA_ENV, SERVICES, Service
from mesh.settings import Settings

log = logging.getLogger(__name__)

MAX_BACKOFF_S = 30.0
STOP_GRACE_S = 15.0


@dataclass
class Child:
    """One supervised process: how to start it and how to tell it is ready."""

    name: str
    ready: Callable[[], Awaitable[bool]]
    # Which replica of its service this process is.
    replica: int = 0
    process: asyncio.subprocess.Process | None = None
    restarts: int = 0
    started_at: float = 0.0
    task: asyncio.Task[None] | None = field(default=None, repr=False)


async def grpc_serving(address: str) -> bool:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            response = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
        except grpc.aio.AioRpcError:
            return False
        return bool(response.status == health_pb2.HealthCheckResponse.SERVING)


async def http_ok(url: str) -> bool:
    async with httpx.AsyncClient(timeout=2) as client:
        try:
            return (await client.get(url)).status_code == 200
        except httpx.HTTPError:
            return False


class Supervisor:
    def __init__(self, settings: Settings, config_path: Path | None) -> None:
        self.settings = settings
        self._config_path = config_path
        self._stopping = False
        self.children = [
            Child(service.name, self._probe(service, replica), replica=replica)
            for service in SERVICES
            if service.enabled(settings)
            for replica in range(service.replicas(settings))
        ]

    def _probe(self, service: Service, replica: int) -> Callable[[], Awaitable[bool]]:
        if service.kind == "http":
            address = self.settings.gateway.addresses[replica]
            return lambda: http_ok(f"http://{address}/readyz")
        if service.kind == "envoy":
            return lambda: http_ok(f"{self.api_url}/readyz")
        address = service.endpoint(self.settings).addresses[replica]
        return lambda: grpc_serving(address)

    @property
    def api_url(self) -> str:
        return f"http://{_connect_host(self.settings.envoy.host)}:{self.settings.envoy.port}"

    @property
    def gateway_url(self) -> str:
        return f"http://{_connect_host(self.settings.gateway.host)}:{self.settings.gateway.port}"

    def _command(self, name: str) -> list[str]:
        command = [sys.executable, "-m", "mesh.cli"]
        if self._config_path is not None:
            command += ["--config", str(self._config_path)]
        return [*command, "serve", name]

    async def _spawn(self, child: Child) -> None:
        service = BY_NAME[child.name]
        nice = service.nice(self.settings)
        child.process = await asyncio.create_subprocess_exec(
            *self._command(child.name),
            stdin=asyncio.subprocess.DEVNULL,
            env={**dict(service.env), **os.environ, REPLICA_ENV: str(child.replica)},
            # Own process group: Ctrl-C reaches the supervisor only, which stops children in
            # order. Not a session of its own: with Linux's autogroup scheduling each session
            # is a scheduling group, and a niceness weighs only against its own group's
            # threads; in the supervisor's session inference-local's niceness weighs against
            # Envoy, the gateway and the Doorman, and the mesh as a whole against other groups.
            process_group=0,
            preexec_fn=functools.partial(_in_child, nice),
        )
        child.started_at = time.monotonic()
        log.info(
            "started",
            extra={"child": child.name, "replica": child.replica, "pid": child.process.pid},
        )

    async def _watch(self, child: Child) -> None:
        """Restart the child whenever it exits while the mesh is up, with capped backoff."""
        backoff = 1.0
        while not self._stopping:
            assert child.process is not None
            code = await child.process.wait()
            if self._stopping:
                return
            log.error(
                "child exited; restarting",
                extra={"child": child.name, "code": code, "backoff_s": backoff},
            )
            await asyncio.sleep(backoff)
            if self._stopping:
                return
            # A child that stayed up a while earns a fresh backoff.
            lived = time.monotonic() - child.started_at
            backoff = 1.0 if lived > 60 else min(backoff * 2, MAX_BACKOFF_S)
            child.restarts += 1
            await self._spawn(child)

    async def start(self, timeout_s: float = 600.0) -> None:
        for child in self.children:
            await self._spawn(child)
            child.task = asyncio.create_task(self._watch(child))
        deadline = time.monotonic() + timeout_s
        for child in self.children:
            while not await child.ready():
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{child.name} did not become ready in {timeout_s:.0f}s")
                await asyncio.sleep(0.2)
            log.info("ready", extra={"child": child.name})

    def hangup(self) -> None:
        """Pass a SIGHUP on to every child whose service reloads its config on one."""
        for child in self.children:
            process = child.process
            if BY_NAME[child.name].reloads and process is not None and process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signal.SIGHUP)
                log.info("SIGHUP passed on", extra={"child": child.name, "replica": child.replica})

    async def stop(self) -> None:
        self._stopping = True
        for child in reversed(self.children):
            if child.task is not None:
                child.task.cancel()
            process = child.process
            if process is None or process.returncode is not None:
                continue
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), STOP_GRACE_S)
            except TimeoutError:
                log.warning("child did not stop; killing", extra={"child": child.name})
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
            log.info("stopped", extra={"child": child.name, "code": process.returncode})


def _in_child(nice: int) -> None:
    """In the child, before exec: its niceness, death with the supervisor, and logs that
    never stop it."""
    if nice:
        os.nice(nice)
    # The child is a background process group of the supervisor's session: on a terminal set
    # to `stty tostop`, its first log line would stop it with SIGTTOU; ignored, it writes.
    signal.signal(signal.SIGTTOU, signal.SIG_IGN)
    _die_with_parent()


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM when the supervisor dies, however it dies.

    Children run in their own process groups, so without this a SIGKILLed `slm up` would leave the
    whole mesh running, holding its ports (Linux only; elsewhere children must be stopped by
    hand after a crash of the supervisor).
    """
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


PR_SET_PDEATHSIG = 1


def _connect_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "") else host


async def run_up(settings: Settings, config_path: Path | None) -> int:
    from slm.server import wait_for_signal

    supervisor = Supervisor(settings, config_path)
    stop = asyncio.create_task(wait_for_signal(supervisor.hangup))
    start = asyncio.create_task(supervisor.start())
    done, _ = await asyncio.wait({stop, start}, return_when=asyncio.FIRST_COMPLETED)
    if start in done and start.exception() is None:
        print(
            f"service-slm is up\n"
            f"  Chat UI:            {supervisor.api_url}/  (admin: {supervisor.api_url}/admin)\n"
            f"  OpenAI API (Envoy): {supervisor.api_url}/v1\n"
            f"  gRPC (Envoy):       {supervisor.api_url.removeprefix('http://')}\n"
            f"  REST gateway:       {supervisor.gateway_url}\n"
            f"  Doorman gRPC:       {settings.doorman.endpoint.address}\n"
            f"Press Ctrl-C to stop.",
            flush=True,
        )
        await stop
        code = 0
    else:
        code = 0 if start not in done else 1
        if start in done:
            log.error("mesh failed to start", exc_info=start.exception())
        start.cancel()
        stop.cancel()
    await supervisor.stop()
    return code
