"""Admin REST endpoints for LoRA adapters, over AdapterRegistryService: /admin/adapters."""

from __future__ import annotations

import logging
from typing import Any, Literal

import grpc
from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import JSONResponse, Response

from gateway import errors
from gateway.channels import ChannelsDep
from gateway.protocol import ErrorResponse
from slm.v1 import adapters_pb2, types_pb2

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


def adapters_router() -> APIRouter:
    """The /admin/adapters routes (the admin router guards them)."""
    router = APIRouter(prefix="/adapters")
    responses: dict[int | str, dict[str, Any]] = {
        s: {"model": ErrorResponse} for s in (400, 401, 403, 404, 409, 500, 503)
    }

    @router.post("", status_code=201, response_model=AdapterView, responses=responses)
    async def register(request: Request, channels: ChannelsDep) -> Response:
        """Register a LoRA adapter: the registry copies the artefact and checks its SHA-256."""
        body = errors.validated(RegisterAdapterBody, await request.body())
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
            reply = await channels.adapters.RegisterAdapter(message, timeout=TIMEOUT_S)
        except grpc.aio.AioRpcError as error:
            return _error(error)
        return JSONResponse(adapter_view(reply.adapter).model_dump(), status_code=201)

    @router.get("", response_model=AdapterList, responses=responses)
    async def list_adapters(
        channels: ChannelsDep, base_model: str = "", page_size: int = 0, page_token: str = ""
    ) -> Response:
        """Registered adapters by name, optionally of one base model, a page at a time."""
        if page_size < 0:
            return errors.invalid_request("page_size must be >= 0", "page_size").response()
        try:
            reply = await channels.adapters.ListAdapters(
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
    async def get_adapter(channels: ChannelsDep, name: str) -> Response:
        """One adapter; its artefact's checksum is verified again on the way."""
        try:
            reply = await channels.adapters.GetAdapter(
                adapters_pb2.GetAdapterRequest(name=name), timeout=TIMEOUT_S
            )
        except grpc.aio.AioRpcError as error:
            return _error(error)
        return JSONResponse(adapter_view(reply.adapter).model_dump())

    @router.delete("/{name}", responses=responses)
    async def delete_adapter(channels: ChannelsDep, name: str) -> Response:
        """Forget an adapter; its artefact goes once no other adapter names it."""
        try:
            await channels.adapters.DeleteAdapter(
                adapters_pb2.DeleteAdapterRequest(name=name), timeout=30
            )
        except grpc.aio.AioRpcError as error:
            return _error(error)
        return JSONResponse({"name": name, "object": "adapter", "deleted": True})

    return router
