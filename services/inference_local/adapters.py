"""Resolves LoRA adapter names through the adapter registry (which verifies the checksum)."""

from __future__ import annotations

from pathlib import Path

import grpc

from inference_local.engine import Adapter
from slm.discovery import Connector
from slm.errors import FailedPrecondition, from_rpc_error
from slm.v1 import adapters_pb2, adapters_pb2_grpc, types_pb2


class RegistryAdapters:
    """An AdapterResolver over AdapterRegistryService; the channel opens on first use."""

    def __init__(self, connector: Connector, address: str) -> None:
        self._connector = connector
        self._address = address
        self._stub: adapters_pb2_grpc.AdapterRegistryServiceStub | None = None

    async def __call__(self, name: str) -> Adapter:
        if self._stub is None:
            self._stub = adapters_pb2_grpc.AdapterRegistryServiceStub(
                self._connector.channel(self._address)
            )
        try:
            # GetAdapter re-hashes the artefact: a corrupt or swapped file is refused here.
            reply = await self._stub.GetAdapter(
                adapters_pb2.GetAdapterRequest(name=name), timeout=300
            )
        except grpc.aio.AioRpcError as error:
            raise from_rpc_error(error) from None
        adapter = reply.adapter
        if adapter.format != adapters_pb2.ADAPTER_FORMAT_GGUF:
            raise FailedPrecondition(
                f"adapter {name!r} is PEFT; inference-local applies GGUF LoRA adapters "
                "(convert it with llama.cpp's convert_lora_to_gguf.py)",
                field="adapter",
            )
        if adapter.tiers and types_pb2.TIER_LOCAL not in adapter.tiers:
            raise FailedPrecondition(
                f"adapter {name!r} is not allowed on the local tier", field="adapter"
            )
        return Adapter(Path(adapter.path), adapter.default_scale or 1.0, adapter.base_model)

    async def close(self) -> None:
        # The connector owns the channel.
        self._stub = None
