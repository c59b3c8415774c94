"""AdapterRegistryService over gRPC: protobuf in and out of the registry core."""

from __future__ import annotations

from typing import Any, TypeAlias

from google.protobuf.timestamp_pb2 import Timestamp

from adapters.artefacts import Format
from adapters.registry import Adapter, AdapterRegistry, Registration
from slm.errors import InvalidArgument
from slm.v1 import adapters_pb2, adapters_pb2_grpc, types_pb2

# grpc ships no type information; the servicer context is untyped.
Context: TypeAlias = Any

FORMATS = {
    adapters_pb2.ADAPTER_FORMAT_GGUF: Format.GGUF,
    adapters_pb2.ADAPTER_FORMAT_PEFT: Format.PEFT,
}
FORMAT_PROTOS = {v: k for k, v in FORMATS.items()}
TIERS = {
    types_pb2.TIER_LOCAL: "local",
    types_pb2.TIER_GPU: "gpu",
    types_pb2.TIER_EXTERNAL: "external",
}
TIER_PROTOS = {v: k for k, v in TIERS.items()}


def registration_from_proto(request: adapters_pb2.RegisterAdapterRequest) -> Registration:
    fmt = FORMATS.get(request.format)
    if fmt is None:
        raise InvalidArgument("format must be GGUF or PEFT", field="format")
    tiers = []
    for tier in request.tiers:
        if tier not in TIERS:
            raise InvalidArgument("tiers must be set values", field="tiers")
        tiers.append(TIERS[tier])
    return Registration(
        name=request.name,
        base_model=request.base_model,
        format=fmt,
        source=request.source,
        sha256=request.sha256,
        default_scale=request.default_scale if request.HasField("default_scale") else 1.0,
        tiers=tuple(tiers),
    )


def adapter_to_proto(adapter: Adapter) -> adapters_pb2.Adapter:
    r = adapter.record
    created = Timestamp()
    created.FromNanoseconds(r.created_unix_ns)
    return adapters_pb2.Adapter(
        name=r.name,
        base_model=r.base_model,
        format=FORMAT_PROTOS[r.format],
        sha256=r.sha256,
        source=r.source,
        default_scale=r.default_scale,
        size_bytes=r.size_bytes,
        create_time=created,
        path=str(adapter.path),
        store_path=r.store_path,
        tiers=[TIER_PROTOS[t] for t in r.tiers],
    )


class AdapterRegistryServicer(adapters_pb2_grpc.AdapterRegistryServiceServicer):
    def __init__(self, registry: AdapterRegistry) -> None:
        self._registry = registry

    async def RegisterAdapter(
        self, request: adapters_pb2.RegisterAdapterRequest, context: Context
    ) -> adapters_pb2.RegisterAdapterResponse:
        adapter = await self._registry.register(registration_from_proto(request))
        return adapters_pb2.RegisterAdapterResponse(adapter=adapter_to_proto(adapter))

    async def GetAdapter(
        self, request: adapters_pb2.GetAdapterRequest, context: Context
    ) -> adapters_pb2.GetAdapterResponse:
        adapter = await self._registry.get(request.name)
        return adapters_pb2.GetAdapterResponse(adapter=adapter_to_proto(adapter))

    async def ListAdapters(
        self, request: adapters_pb2.ListAdaptersRequest, context: Context
    ) -> adapters_pb2.ListAdaptersResponse:
        page = await self._registry.list(request.base_model, request.page_size, request.page_token)
        return adapters_pb2.ListAdaptersResponse(
            adapters=[adapter_to_proto(a) for a in page.adapters],
            next_page_token=page.next_page_token,
        )

    async def DeleteAdapter(
        self, request: adapters_pb2.DeleteAdapterRequest, context: Context
    ) -> adapters_pb2.DeleteAdapterResponse:
        await self._registry.delete(request.name)
        return adapters_pb2.DeleteAdapterResponse()
