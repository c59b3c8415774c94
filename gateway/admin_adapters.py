"""Admin REST endpoints for LoRA adapters, over AdapterRegistryService: /admin/adapters."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any, Literal

import grpc
from fastapi import APIRouter, FastAPI, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.responses import JSONResponse, Response

from gateway import errors
from gateway.admin import AdminGuard
from gateway.config import GatewaySettings
from gateway.protocol import ErrorResponse
from slm.server import open_channel
from slm.v1 import adapters_pb2, adapters_pb2_grpc, types_pb2

log = logging.getLogger(__name__)

FORMATS = {"gguf": adapters_pb2.ADAPTER_FORMAT_GGUF, "peft": adapters_pb2.ADAPTER_FORMAT_PEFT}
FORMAT_NAMES = {v: k for k, v in FORMATS.items()}
TIERS = {
    "local": types_pb2.TIER_LOCAL,
    "gpu": types_pb2.TIER_GPU,
    "external": types_pb2.TIER_EXTERNAL,
}
TIER_NAMES = {v: k for k, v in TIERS.items()}
TIMEOUT_S = 600.0  # registering copies and hashes the artefact, which may be gigabytes


class RegisterAdapterBody(BaseModel):
    """POST /admin/adapters."""

    model_config = ConfigDict(extra="forbid")

    name: str
    base_model: str
    format: Literal["gguf", "peft"]
    # A local path on the registry's host, or a file://, http:// or https:// URI.
    source: str
    # Expected hex SHA-256; omitted: the checksum of what was read is recorded.
    sha256: str = ""
    default_scale: float | None = None
    tiers: list[Literal["local", "gpu", "external"]] = Field(default_factory=list)


class AdapterView(BaseModel):
    """An adapter as the admin API shows it."""

    name: str
    object: Literal["adapter"] = "adapter"
    base_model: str
    format: str
    sha256: str
    source: str
    default_scale: float
    size_bytes: int
    created: int
    path: str
    tiers: list[str]


class AdapterList(BaseModel):
    object: Literal["list"] = "list"
    data: list[AdapterView]
    next_page_token: str


def adapter_view(adapter: adapters_pb2.Adapter) -> AdapterView:
    return AdapterView(
        name=adapter.name,
        base_model=adapter.base_model,
        format=FORMAT_NAMES.get(adapter.format, "unspecified"),
        sha256=adapter.sha256,
        source=adapter.source,
        default_scale=adapter.default_scale,
        size_bytes=adapter.size_bytes,
        created=adapter.create_time.seconds,
        path=adapter.path,
        tiers=[TIER_NAMES[t] for t in adapter.tiers if t in TIER_NAMES],
    )


def _error(error: grpc.RpcError) -> Response:
    if error.code() == grpc.StatusCode.ALREADY_EXISTS:
        # googleapis maps ALREADY_EXISTS to 409; the shared table has no row for it.
        http = errors.from_grpc(error)
        return errors.HttpError(
            409, http.message, errors.INVALID_REQUEST, "already_exists", http.param
        ).response()
    return errors.from_grpc(error).response()


class _Registry:
    """The registry channel, open between the gateway's startup and shutdown."""

    stub: adapters_pb2_grpc.AdapterRegistryServiceStub | None = None


def adapters_router(settings: GatewaySettings) -> APIRouter:
    """The /admin/adapters routes, guarded by the admin key, with their channel's lifespan."""
    guard = AdminGuard(settings.gateway)
    registry = _Registry()
    address = settings.gateway.adapter_registry

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        channel = open_channel(address, settings.telemetry)
        registry.stub = adapters_pb2_grpc.AdapterRegistryServiceStub(channel)
        try:
            yield
        finally:
            registry.stub = None
            await channel.close(grace=None)

    router = APIRouter(prefix="/admin/adapters", tags=["admin"], lifespan=lifespan)
    responses: dict[int | str, dict[str, Any]] = {
        s: {"model": ErrorResponse} for s in (400, 401, 403, 404, 409, 500, 503)
    }

    def stub() -> adapters_pb2_grpc.AdapterRegistryServiceStub:
        if registry.stub is None:
            raise RuntimeError("the gateway is not started: its lifespan has not run")
        return registry.stub

    @router.post("", status_code=201, response_model=AdapterView, responses=responses)
    async def register(request: Request) -> Response:
        """Register a LoRA adapter: the registry copies the artefact and checks its SHA-256."""
        if denied := guard.check(request):
            return denied.response()
        try:
            body = RegisterAdapterBody.model_validate_json(await request.body())
        except ValidationError as error:
            first = error.errors()[0]
            param = ".".join(str(p) for p in first["loc"]) or None
            return errors.invalid_request(str(first["msg"]), param).response()
        message = adapters_pb2.RegisterAdapterRequest(
            name=body.name,
            base_model=body.base_model,
            format=FORMATS[body.format],
            source=body.source,
            sha256=body.sha256,
            tiers=[TIERS[t] for t in body.tiers],
        )
        if body.default_scale is not None:
            message.default_scale = body.default_scale
        try:
            reply = await stub().RegisterAdapter(message, timeout=TIMEOUT_S)
        except grpc.aio.AioRpcError as error:
            return _error(error)
        return JSONResponse(adapter_view(reply.adapter).model_dump(), status_code=201)

    @router.get("", response_model=AdapterList, responses=responses)
    async def list_adapters(
        request: Request, base_model: str = "", page_size: int = 0, page_token: str = ""
    ) -> Response:
        """Registered adapters by name, optionally of one base model, a page at a time."""
        if denied := guard.check(request):
            return denied.response()
        if page_size < 0:
            return errors.invalid_request("page_size must be >= 0", "page_size").response()
        try:
            reply = await stub().ListAdapters(
                adapters_pb2.ListAdaptersRequest(
                    base_model=base_model, page_size=page_size, page_token=page_token
                ),
                timeout=30,
            )
        except grpc.aio.AioRpcError as error:
            return _error(error)
        page = AdapterList(
            data=[adapter_view(a) for a in reply.adapters], next_page_token=reply.next_page_token
        )
        return JSONResponse(page.model_dump())

    @router.get("/{name}", response_model=AdapterView, responses=responses)
    async def get_adapter(request: Request, name: str) -> Response:
        """One adapter; its artefact's checksum is verified again on the way."""
        if denied := guard.check(request):
            return denied.response()
        try:
            reply = await stub().GetAdapter(
                adapters_pb2.GetAdapterRequest(name=name), timeout=TIMEOUT_S
            )
        except grpc.aio.AioRpcError as error:
            return _error(error)
        return JSONResponse(adapter_view(reply.adapter).model_dump())

    @router.delete("/{name}", responses=responses)
    async def delete_adapter(request: Request, name: str) -> Response:
        """Forget an adapter; its artefact goes once no other adapter names it."""
        if denied := guard.check(request):
            return denied.response()
        try:
            await stub().DeleteAdapter(adapters_pb2.DeleteAdapterRequest(name=name), timeout=30)
        except grpc.aio.AioRpcError as error:
            return _error(error)
        return JSONResponse({"name": name, "object": "adapter", "deleted": True})

    return router
