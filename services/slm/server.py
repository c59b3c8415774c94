"""gRPC server bootstrap shared by every service: health, reflection, metrics, graceful shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import signal
from collections.abc import Callable, Coroutine, Sequence
from types import TracebackType
from typing import Any, Protocol, Self, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry, start_http_server

from slm import telemetry
from slm.config import ServiceEndpoint, TelemetryConfig
from slm.interceptors import ErrorInterceptor, RpcMetrics

log = logging.getLogger(__name__)

T = TypeVar("T")

# Generation streams can be long; keep connections alive through idle proxies.
SERVER_OPTIONS: Sequence[tuple[str, int]] = (
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    # Clients ping every 30 s (CHANNEL_OPTIONS); grpc's default here (5 min) counts those as
    # strikes and answers GOAWAY "too_many_pings", failing the call in flight as UNAVAILABLE.
    ("grpc.http2.min_ping_interval_without_data_ms", 20_000),
    ("grpc.max_receive_message_length", 16 << 20),
    ("grpc.so_reuseport", 0),
)


class ServiceApp(Protocol):
    """What a service plugs into the bootstrap: its servicers and its resource lifecycle."""

    @property
    def service_names(self) -> Sequence[str]:
        """Full names of the gRPC services it serves, e.g. "slm.v1.LedgerService"."""

    def add_to_server(self, server: grpc.aio.Server) -> None: ...

    async def start(self) -> None:
        """Acquire resources (open databases, load models); health turns SERVING after this."""

    async def stop(self) -> None:
        """Release resources after the server has drained."""


class GrpcService:
    """Runs one ServiceApp on a grpc.aio server; an async context manager.

    Health reports NOT_SERVING until the app has started, and again as soon as shutdown begins.
    """

    def __init__(
        self,
        name: str,
        app: ServiceApp,
        endpoint: ServiceEndpoint,
        telemetry_config: TelemetryConfig,
        registry: CollectorRegistry,
        *,
        serve_metrics: bool = True,
        grace_s: float = 10.0,
    ) -> None:
        self.name = name
        self.app = app
        self.endpoint = endpoint
        self.registry = registry
        self._telemetry_config = telemetry_config
        self._serve_metrics = serve_metrics
        self._grace_s = grace_s
        self._health = health.aio.HealthServicer()
        self._server: grpc.aio.Server | None = None
        self._metrics_server: object | None = None
        self.port = 0
        self.metrics_port = 0

    async def __aenter__(self) -> Self:
        interceptors: list[grpc.aio.ServerInterceptor] = [
            *telemetry.server_interceptors(self._telemetry_config),
            ErrorInterceptor(RpcMetrics(self.registry)),
        ]
        server = grpc.aio.server(interceptors=interceptors, options=SERVER_OPTIONS)
        self.app.add_to_server(server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        names = [*self.app.service_names, health.SERVICE_NAME, reflection.SERVICE_NAME]
        reflection.enable_server_reflection(names, server)
        for service in ("", *self.app.service_names):
            await self._health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        self.port = server.add_insecure_port(f"{self.endpoint.host}:{self.endpoint.port}")
        if self.port == 0:
            raise OSError(f"{self.name}: cannot bind {self.endpoint.host}:{self.endpoint.port}")
        await server.start()
        self._server = server
        if self._serve_metrics:
            httpd, _thread = start_http_server(
                self.endpoint.metrics_port, addr=self.endpoint.host, registry=self.registry
            )
            self._metrics_server = httpd
            self.metrics_port = httpd.server_port
        try:
            await self.app.start()
        except BaseException:
            await self._shutdown()
            raise
        for service in ("", *self.app.service_names):
            await self._health.set(service, health_pb2.HealthCheckResponse.SERVING)
        log.info(
            "serving",
            extra={"address": f"{self.endpoint.host}:{self.port}", "metrics": self.metrics_port},
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._shutdown()

    async def _shutdown(self) -> None:
        # Ordered: tell load balancers first, stop taking calls and drain, then free resources.
        await self._health.enter_graceful_shutdown()
        if self._server is not None:
            await self._server.stop(self._grace_s)
            self._server = None
        await self.app.stop()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()  # type: ignore[attr-defined]
            self._metrics_server.server_close()  # type: ignore[attr-defined]
            self._metrics_server = None
        log.info("stopped")


def run_process(main: Coroutine[Any, Any, T]) -> T:
    """Run a service process's main coroutine to the end on a uvloop event loop when uvloop is
    installed (it comes with uvicorn[standard]), else on asyncio's own."""
    if importlib.util.find_spec("uvloop"):
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(main)
    return asyncio.run(main)


async def wait_for_signal(on_hangup: Callable[[], None] | None = None) -> None:
    """Return when SIGTERM or SIGINT arrives; call `on_hangup` on each SIGHUP meanwhile (with
    none, SIGHUP is logged and ignored rather than ending the process)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(
        signal.SIGHUP, on_hangup or (lambda: log.info("SIGHUP: nothing to reload here"))
    )
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(sig)


CHANNEL_OPTIONS: Sequence[tuple[str, int]] = (
    ("grpc.keepalive_time_ms", 30_000),
    # grpc's default backoff grows to 120 s; a restarted peer should be found within seconds.
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2_000),
    ("grpc.max_receive_message_length", 16 << 20),
)


def open_channel(address: str, telemetry_config: TelemetryConfig) -> grpc.aio.Channel:
    """An insecure channel for mesh-internal calls on loopback or a private network."""
    return grpc.aio.insecure_channel(
        address,
        options=CHANNEL_OPTIONS,
        interceptors=telemetry.client_interceptors(telemetry_config),
    )
