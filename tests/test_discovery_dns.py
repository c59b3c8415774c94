"""Kubernetes-mode discovery against a DNS server on loopback: a name with several A records is
balanced round-robin, listed for fan-out, and an instance whose health check fails is skipped."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections import Counter
from collections.abc import AsyncIterator, Iterator

import dns.message
import dns.rcode
import dns.rrset
import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from slm.config import DiscoveryConfig, TelemetryConfig
from slm.discovery import Connector

NAME = "replicas.ns.svc.test."
ADDRESSES = ("127.0.0.1", "127.0.0.2", "127.0.0.3")


class LoopbackDns:
    """A UDP DNS server answering NAME with one A record per address; anything else is empty."""

    def __init__(self, addresses: tuple[str, ...]) -> None:
        self.addresses = addresses
        self.queries: Counter[str] = Counter()
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                data, peer = self._sock.recvfrom(4096)
            except OSError:
                return  # closed
            query = dns.message.from_wire(data)
            reply = dns.message.make_response(query)
            question = query.question[0]
            self.queries[dns.rdatatype.to_text(question.rdtype)] += 1
            if question.name.to_text().lower() == NAME and question.rdtype == dns.rdatatype.A:
                reply.answer.append(dns.rrset.from_text(NAME, 1, "IN", "A", *self.addresses))
            elif question.name.to_text().lower() != NAME:
                reply.set_rcode(dns.rcode.NXDOMAIN)
            self._sock.sendto(reply.to_wire(), peer)

    def close(self) -> None:
        self._sock.close()


def who_handler(name: str) -> grpc.GenericRpcHandler:
    return grpc.method_handlers_generic_handler(
        "test.Who", {"Name": grpc.unary_unary_rpc_method_handler(lambda _r, _c: name.encode())}
    )


@pytest.fixture
def dns_server() -> Iterator[LoopbackDns]:
    server = LoopbackDns(ADDRESSES)
    yield server
    server.close()


@pytest.fixture
async def servers() -> AsyncIterator[tuple[int, list[health.aio.HealthServicer]]]:
    """One server per address, all on the same port (DNS names one port for every record)."""
    for _ in range(20):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        started: list[grpc.aio.Server] = []
        healths: list[health.aio.HealthServicer] = []
        try:
            for host in ADDRESSES:
                server = grpc.aio.server()
                server.add_generic_rpc_handlers((who_handler(host),))
                servicer = health.aio.HealthServicer()
                health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
                if server.add_insecure_port(f"{host}:{port}") == 0:
                    raise OSError(f"{host}:{port} taken")
                await server.start()
                started.append(server)
                healths.append(servicer)
        except (OSError, RuntimeError):
            for server in started:
                await server.stop(None)
            continue
        try:
            yield port, healths
        finally:
            for server in started:
                await server.stop(None)
        return
    pytest.fail("no port free on every loopback address")


def connector(dns_server: LoopbackDns) -> Connector:
    config = DiscoveryConfig(
        mode="kubernetes",
        namespace="ns",
        cluster_domain="test",
        dns_server=f"127.0.0.1:{dns_server.port}",
    )
    return Connector(config, TelemetryConfig())


async def who(channel: grpc.aio.Channel) -> str:
    answer: bytes = await channel.unary_unary("/test.Who/Name")(b"", timeout=10)
    return answer.decode()


async def until_answered_by(channel: grpc.aio.Channel, expected: set[str]) -> None:
    """Call until one full turn of the rotation is answered by exactly `expected`."""
    async with asyncio.timeout(30):
        while {await who(channel) for _ in range(2 * len(ADDRESSES))} != expected:
            continue


async def test_a_name_with_several_a_records_is_balanced_over_all_of_them(
    dns_server: LoopbackDns, servers: tuple[int, list[health.aio.HealthServicer]]
) -> None:
    port, _ = servers
    mesh = connector(dns_server)
    try:
        channel = mesh.channel(f"replicas:{port}")
        await until_answered_by(channel, set(ADDRESSES))
        # Every instance is connected now: round robin takes them in turn.
        answers = Counter([await who(channel) for _ in range(30)])
    finally:
        await mesh.close()
    assert dns_server.queries["A"] >= 1
    assert answers == {address: 10 for address in ADDRESSES}


async def test_instances_lists_every_record_for_fan_out(
    dns_server: LoopbackDns, servers: tuple[int, list[health.aio.HealthServicer]]
) -> None:
    port, _ = servers
    mesh = connector(dns_server)
    try:
        instances = await mesh.instances(f"replicas:{port}")
        reached = {await who(mesh.instance_channel(i)) for i in instances}
    finally:
        await mesh.close()
    assert instances == [f"{address}:{port}" for address in ADDRESSES]
    assert reached == set(ADDRESSES)


async def test_an_instance_failing_its_health_check_leaves_the_rotation(
    dns_server: LoopbackDns, servers: tuple[int, list[health.aio.HealthServicer]]
) -> None:
    port, healths = servers
    mesh = connector(dns_server)
    try:
        channel = mesh.channel(f"replicas:{port}")
        await until_answered_by(channel, set(ADDRESSES))
        await healths[1].set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        # The client's health watch learns it asynchronously: wait until the rotation shrinks.
        await until_answered_by(channel, {ADDRESSES[0], ADDRESSES[2]})
        answers = {await who(channel) for _ in range(30)}
    finally:
        await mesh.close()
    assert answers == {ADDRESSES[0], ADDRESSES[2]}
