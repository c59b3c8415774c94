"""Discovery: static and Kubernetes targets, and Consul against a fake of its HTTP API."""

from __future__ import annotations

import contextlib
import json
import re
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry

from slm.config import DiscoveryConfig, ServiceEndpoint, TelemetryConfig
from slm.discovery import (
    ConsulResolver,
    FollowingChannel,
    Instance,
    KubernetesResolver,
    StaticResolver,
    build_resolver,
    connect,
    instances_target,
    registration,
)
from slm.server import GrpcService

TELEMETRY = TelemetryConfig()

# py-consul 1.8's asyncio client still hands aiohttp an ssl_context, which aiohttp deprecates.
pytestmark = pytest.mark.filterwarnings("ignore:ssl_context is deprecated:DeprecationWarning")


# --- the fake ------------------------------------------------------------------------------


def _duration_s(text: str) -> float:
    """Go duration strings as Consul takes them ("10s", "100ms", "1m")."""
    match = re.fullmatch(r"([0-9.]+)(ms|s|m)", text)
    if not match:
        raise ValueError(f"bad duration {text!r}")
    value, unit = float(match[1]), match[2]
    return value / 1000 if unit == "ms" else value * 60 if unit == "m" else value


@dataclass
class _Registered:
    body: dict[str, Any]
    status: str = "critical"  # Consul's initial state of a check that has not run yet.
    next_check: float = 0.0


@dataclass
class FakeConsul:
    """A fake Consul agent: the HTTP API the mesh uses, as Consul documents it.

    PUT /v1/agent/service/register, PUT /v1/agent/service/deregister/:id and
    GET /v1/health/service/:name (?passing, and blocking queries with ?index&wait answered with
    X-Consul-Index). gRPC checks are real: the fake calls grpc.health.v1 at each check's interval.
    """

    services: dict[str, _Registered] = field(default_factory=dict)
    registrations: list[dict[str, Any]] = field(default_factory=list)
    index: int = 1
    _changed: threading.Condition = field(default_factory=threading.Condition)
    _stop: threading.Event = field(default_factory=threading.Event)

    def start(self) -> str:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                return None

            def _reply(self, status: int, body: object, index: int | None = None) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                if index is not None:
                    self.send_header("X-Consul-Index", str(index))
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                # A client that cancels its blocking query has gone; the agent just moves on.
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    self.wfile.write(data)

            def do_PUT(self) -> None:
                url = urlsplit(self.path)
                length = int(self.headers.get("content-length") or 0)
                raw = self.rfile.read(length) if length else b""
                if url.path == "/v1/agent/service/register":
                    fake.register(json.loads(raw))
                    self._reply(200, None)
                elif url.path.startswith("/v1/agent/service/deregister/"):
                    fake.deregister(url.path.rsplit("/", 1)[1])
                    self._reply(200, None)
                else:
                    self._reply(404, {"error": "not found"})

            def do_GET(self) -> None:
                url = urlsplit(self.path)
                prefix = "/v1/health/service/"
                if not url.path.startswith(prefix):
                    self._reply(404, {"error": "not found"})
                    return
                query = parse_qs(url.query, keep_blank_values=True)
                index = int(query.get("index", ["0"])[0])
                # Consul's default wait is 5 minutes; a blocking query needs an index.
                wait = _duration_s(query.get("wait", ["5m"])[0])
                name = url.path[len(prefix) :]
                current, entries = fake.health(name, "passing" in query, index, wait)
                self._reply(200, entries, current)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._threads = [
            threading.Thread(target=self._server.serve_forever, daemon=True),
            threading.Thread(target=self._run_checks, daemon=True),
        ]
        for thread in self._threads:
            thread.start()
        return f"http://127.0.0.1:{self._server.server_port}"

    def stop(self) -> None:
        self._stop.set()
        with self._changed:
            self._changed.notify_all()
        self._server.shutdown()
        self._server.server_close()
        for thread in self._threads:
            thread.join(timeout=10)

    def _bump(self) -> None:
        self.index += 1
        self._changed.notify_all()

    def register(self, raw: dict[str, Any]) -> None:
        # Consul decodes a registration's keys case-insensitively; py-consul sends lower case.
        body = {k.lower(): v for k, v in raw.items()}
        checks = body.pop("checks", None) or [body.pop("check", None)]
        body["checks"] = [{k.lower(): v for k, v in c.items()} for c in checks if c]
        with self._changed:
            self.registrations.append(body)
            service_id = body.get("id") or body["name"]
            self.services[service_id] = _Registered(body)
            self._bump()

    def deregister(self, service_id: str) -> None:
        with self._changed:
            if self.services.pop(service_id, None) is not None:
                self._bump()

    def health(
        self, name: str, passing: bool, index: int, wait_s: float
    ) -> tuple[int, list[dict[str, Any]]]:
        deadline = time.monotonic() + wait_s
        with self._changed:
            while index and index >= self.index and not self._stop.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._changed.wait(left)
            entries = [
                self._entry(service_id, reg)
                for service_id, reg in self.services.items()
                if reg.body["name"] == name and (not passing or reg.status == "passing")
            ]
            return self.index, entries

    @staticmethod
    def _entry(service_id: str, reg: _Registered) -> dict[str, Any]:
        body = reg.body
        return {
            "Node": {"Node": "fake-node", "Address": "127.0.0.1"},
            "Service": {
                "ID": service_id,
                "Service": body["name"],
                "Address": body.get("address", ""),
                "Port": body.get("port", 0),
                "Tags": body.get("tags") or [],
            },
            "Checks": [
                {
                    "CheckID": f"service:{service_id}",
                    "ServiceID": service_id,
                    "Status": reg.status,
                }
            ],
        }

    @staticmethod
    def _check_spec(body: dict[str, Any]) -> tuple[str, float] | None:
        for check in body["checks"]:
            if "grpc" in check:
                return str(check["grpc"]), _duration_s(str(check["interval"]))
        return None

    def _run_checks(self) -> None:
        while not self._stop.is_set():
            with self._changed:
                due = [
                    (sid, reg)
                    for sid, reg in self.services.items()
                    if reg.next_check <= time.monotonic()
                ]
            for service_id, reg in due:
                spec = self._check_spec(reg.body)
                if spec is None:
                    continue
                target, interval = spec
                status = "passing" if _grpc_serving(target) else "critical"
                with self._changed:
                    reg.next_check = time.monotonic() + interval
                    if self.services.get(service_id) is reg and reg.status != status:
                        reg.status = status
                        self._bump()
            # The agent's scheduler tick; checks themselves run at their own interval.
            self._stop.wait(0.02)


def _grpc_serving(target: str) -> bool:
    with grpc.insecure_channel(target) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=1
            )
        except grpc.RpcError:
            return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


# --- fixtures ------------------------------------------------------------------------------


class _HealthOnly:
    """A service app with no RPCs of its own: GrpcService adds health and reflection."""

    service_names: tuple[str, ...] = ()

    def add_to_server(self, server: grpc.aio.Server) -> None:
        return None

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None


def _grpc_service() -> GrpcService:
    endpoint = ServiceEndpoint(host="127.0.0.1", port=0, metrics_port=0)
    return GrpcService(
        "echo", _HealthOnly(), endpoint, TELEMETRY, CollectorRegistry(), serve_metrics=False
    )


@pytest.fixture
def consul() -> Iterator[tuple[FakeConsul, str]]:
    fake = FakeConsul()
    url = fake.start()
    yield fake, url
    fake.stop()


@pytest.fixture
async def resolver(consul: tuple[FakeConsul, str]) -> AsyncIterator[ConsulResolver]:
    config = DiscoveryConfig(mode="consul", consul_url=consul[1], consul_wait_s=5)
    built = ConsulResolver.from_config(config)
    yield built
    await built.close()


def _config(url: str) -> DiscoveryConfig:
    return DiscoveryConfig(mode="consul", consul_url=url, consul_check_interval_s=0.05)


# --- tests ---------------------------------------------------------------------------------


def test_static_is_the_default_and_costs_nothing() -> None:
    resolver = build_resolver(DiscoveryConfig())
    assert isinstance(resolver, StaticResolver)
    assert resolver.resolve("127.0.0.1:50052") == "127.0.0.1:50052"
    assert not resolver.follows("doorman:50051")


async def test_static_connect_is_a_plain_channel() -> None:
    channel = connect(StaticResolver(), "127.0.0.1:1", TELEMETRY)
    assert not isinstance(channel, FollowingChannel)
    assert isinstance(channel, grpc.aio.Channel)
    await channel.close()


def test_kubernetes_names_become_cluster_dns() -> None:
    resolver = build_resolver(
        DiscoveryConfig(mode="kubernetes", namespace="llm", cluster_domain="k8s.local")
    )
    assert resolver.resolve("slm-doorman:50051") == "dns:///slm-doorman.llm.svc.k8s.local:50051"
    # Qualified names and IPs are kept; gRPC's own schemes pass through.
    assert resolver.resolve("ledger.other.svc:50056") == "dns:///ledger.other.svc:50056"
    assert resolver.resolve("10.0.0.7:50052") == "10.0.0.7:50052"
    assert resolver.resolve("dns:///x.y:1") == "dns:///x.y:1"
    with pytest.raises(ValueError, match="host:port"):
        KubernetesResolver("llm").resolve("no-port")


def test_targets_list_every_instance() -> None:
    two = [Instance("10.0.0.1", 5), Instance("10.0.0.2", 6)]
    assert instances_target(two) == "ipv4:10.0.0.1:5,10.0.0.2:6"
    assert instances_target([Instance("::1", 7)]) == "ipv6:[::1]:7"
    assert instances_target([Instance("node-a.example", 8)]) == "dns:///node-a.example:8"


async def test_registers_with_a_grpc_health_check_and_deregisters(
    consul: tuple[FakeConsul, str],
) -> None:
    fake, url = consul
    async with _grpc_service() as service:
        async with registration(_config(url), "ledger", "127.0.0.1", service.port):
            (body,) = fake.registrations
            assert body["name"] == "ledger"
            assert body["address"] == "127.0.0.1"
            assert body["port"] == service.port
            (check,) = body["checks"]
            assert check["grpc"] == f"127.0.0.1:{service.port}"
            assert check["interval"] == "0.05s"
            assert list(fake.services) == [f"ledger-127.0.0.1-{service.port}"]
        assert fake.services == {}


async def test_blocking_query_returns_on_change_only(
    consul: tuple[FakeConsul, str], resolver: ConsulResolver
) -> None:
    _, url = consul
    index, instances = await resolver.healthy("ledger")
    assert instances == []
    async with (
        _grpc_service() as service,
        registration(_config(url), "ledger", "127.0.0.1", service.port),
    ):
        # Blocks until the agent's gRPC check turns the instance passing.
        seen: list[Instance] = []
        while not seen:
            index, seen = await resolver.healthy("ledger", index)
        assert seen == [Instance("127.0.0.1", service.port)]


async def test_watch_follows_healthy_instances(
    consul: tuple[FakeConsul, str], resolver: ConsulResolver
) -> None:
    _, url = consul
    config = _config(url)
    first, second = _grpc_service(), _grpc_service()
    await first.__aenter__()
    await second.__aenter__()
    try:
        async with (
            registration(config, "ledger", "127.0.0.1", first.port),
            registration(config, "ledger", "127.0.0.1", second.port),
        ):
            both = sorted(
                [Instance("127.0.0.1", first.port), Instance("127.0.0.1", second.port)],
                key=lambda i: i.port,
            )
            watch = resolver.watch("ledger")
            assert isinstance(watch, AsyncGenerator)
            async for instances in watch:
                if instances == both:
                    break
            # The first instance goes away: its health turns NOT_SERVING and the port closes,
            # so the agent's check fails and the blocking query returns the smaller set.
            await first.__aexit__(None, None, None)
            async for instances in watch:
                if instances == [Instance("127.0.0.1", second.port)]:
                    break
            await watch.aclose()
    finally:
        await second.__aexit__(None, None, None)


async def test_following_channel_moves_to_healthy_instances(
    consul: tuple[FakeConsul, str], resolver: ConsulResolver
) -> None:
    _, url = consul
    async with (
        _grpc_service() as service,
        registration(_config(url), "ledger", "127.0.0.1", service.port),
    ):
        assert resolver.follows("ledger:0")
        assert not resolver.follows("127.0.0.1:50056")
        channel = connect(resolver, "ledger:0", TELEMETRY)
        assert isinstance(channel, FollowingChannel)
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            async with channel.changed:
                await channel.changed.wait_for(
                    lambda: channel.target == f"ipv4:127.0.0.1:{service.port}"
                )
            # The stub was built before the move; it now calls the instance Consul named.
            reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        finally:
            await channel.close()
