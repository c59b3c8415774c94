"""The gateway's gRPC clients: one Connector, opened at startup, behind every hop it makes."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated

import grpc
from fastapi import Depends, FastAPI, Request
from grpc_health.v1 import health_pb2_grpc

from gateway.config import GatewayConfig, GatewaySettings
from slm.discovery import Connector
from slm.v1 import (
    adapters_pb2_grpc,
    doorman_pb2_grpc,
    inference_pb2_grpc,
    ledger_pb2_grpc,
)


@dataclass(frozen=True)
class Replica:
    """One instance of a replicated service, with a stub that reaches only it."""

    address: str
    stub: inference_pb2_grpc.InferenceServiceStub


class Channels:
    """Stubs for every service the gateway calls, all over one Connector: each address is
    balanced round-robin over its healthy instances, and fan-out reaches each instance."""

    def __init__(self, connector: Connector, config: GatewayConfig) -> None:
        self._connector = connector
        self._inference_local = config.inference_local
        self.doorman_channel: grpc.aio.Channel = connector.channel(config.doorman)
        self.doorman = doorman_pb2_grpc.DoormanServiceStub(self.doorman_channel)
        self.doorman_health = health_pb2_grpc.HealthStub(self.doorman_channel)
        self.ledger = ledger_pb2_grpc.LedgerServiceStub(connector.channel(config.ledger))
        self.adapters = adapters_pb2_grpc.AdapterRegistryServiceStub(
            connector.channel(config.adapter_registry)
        )

    async def inference_replicas(self) -> list[Replica]:
        """Every inference-local instance there is now, each with its own stub: for calls that
        must reach all of them (loading a model) or report on each (listing). Raises OSError
        when discovery cannot say."""
        instances = await self._connector.instances(self._inference_local)
        return [
            Replica(i, inference_pb2_grpc.InferenceServiceStub(self._connector.instance_channel(i)))
            for i in instances
        ]

    @classmethod
    @contextlib.asynccontextmanager
    async def open(cls, settings: GatewaySettings) -> AsyncIterator[Channels]:
        """The gateway's channels, from one Connector; closed on the way out. Must be entered
        inside the event loop that serves the app."""
        connector = Connector(settings.discovery, settings.telemetry)
        try:
            yield cls(connector, settings.gateway)
        finally:
            # uvicorn has drained in-flight requests by now; nothing uses the channels any more.
            await connector.close()


def install_channels(app: FastAPI, channels: Channels | None) -> None:
    """Make `channels` what routes get (None once the app has stopped)."""
    app.state.channels = channels


def current(request: Request) -> Channels:
    """FastAPI dependency: the running app's Channels."""
    channels: Channels | None = getattr(request.app.state, "channels", None)
    if channels is None:
        raise RuntimeError("the gateway is not started: its lifespan has not run")
    return channels


# What a route declares to get the gateway's channels.
ChannelsDep = Annotated[Channels, Depends(current)]
