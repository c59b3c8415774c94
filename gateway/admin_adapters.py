"""Admin REST endpoints for LoRA adapters, over AdapterRegistryService: /admin/adapters."""

from __future__ import annotations

import logging
from typing import Annotated, Any, Literal

import grpc
from fastapi import APIRouter, Path, Query, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import JSONResponse, Response

from gateway import errors
from gateway.channels import ChannelsDep
from gateway.protocol import ErrorResponse, request_body_doc
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
# The registry's own rules (services/adapters/registry.py), stated here so that the OpenAPI
# document says what is refused, and so that nothing out of a protobuf field's range reaches it.
NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,63}$"
SHA256_PATTERN = r"^([0-9a-f]{64})?$"
MAX_SCALE = 4.0
MAX_PAGE = 1000
MAX_TEXT = 4096

AdapterName = Annotated[
    str,
    Path(
        pattern=NAME_PATTERN,
        description="1-64 of a-z, 0-9, '.', '_', '-', starting with a letter or digit.",
        examples=["support-tone"],
    ),
]


class RegisterAdapterBody(BaseModel):
    """POST /admin/adapters."""

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={
            "examples": [
                {
                    "name": "support-tone",
                    "base_model": "gemma-3-270m",
                    "format": "gguf",
                    "source": "support-tone.gguf",
                    "default_scale": 1.0,
                    "tiers": ["local"],
                }
            ]
        },
    )

    name: str = Field(pattern=NAME_PATTERN)
    base_model: str = Field(min_length=1, max_length=MAX_TEXT)
    format: Literal["gguf", "peft"]
    # A local path on the registry's host, or a file://, http:// or https:// URI.
    source: str = Field(min_length=1, max_length=MAX_TEXT)
    # Expected lower-case hex SHA-256; omitted: the checksum of what was read is recorded.
    sha256: str = Field(default="", pattern=SHA256_PATTERN)
    default_scale: float | None = Field(default=None, ge=0.0, le=MAX_SCALE)
    tiers: list[Literal["local", "gpu", "external"]] = Field(default_factory=list, max_length=3)


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


class AdapterDeleted(BaseModel):
    name: str
    object: Literal["adapter"] = "adapter"
    deleted: Literal[True] = True


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

    # The stateful phase of a fuzzer (and a reader) learns from these links that the name a
    # registration returns is what GET and DELETE /admin/adapters/{name} take.
    by_name = {"name": "$response.body#/name"}
    links = {
        "GetAdapter": {"operationId": "get_adapter", "parameters": by_name},
        "DeleteAdapter": {"operationId": "delete_adapter", "parameters": by_name},
    }

    @router.post(
        "",
        status_code=201,
        operation_id="register_adapter",
        responses={**responses, 201: {"model": AdapterView, "links": links}},
        openapi_extra=request_body_doc(RegisterAdapterBody),
    )
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

    @router.get("", operation_id="list_adapters", response_model=AdapterList, responses=responses)
    async def list_adapters(
        channels: ChannelsDep,
        base_model: Annotated[str, Query(max_length=MAX_TEXT)] = "",
        page_size: Annotated[
            int, Query(ge=0, le=MAX_PAGE, description="0 means the maximum, 1000.")
        ] = 0,
        page_token: Annotated[str, Query(max_length=MAX_TEXT)] = "",
    ) -> Response:
        """Registered adapters by name, optionally of one base model, a page at a time."""
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

    @router.get(
        "/{name}", operation_id="get_adapter", response_model=AdapterView, responses=responses
    )
    async def get_adapter(channels: ChannelsDep, name: AdapterName) -> Response:
        """One adapter; its artefact's checksum is verified again on the way."""
        try:
            reply = await channels.adapters.GetAdapter(
                adapters_pb2.GetAdapterRequest(name=name), timeout=TIMEOUT_S
            )
        except grpc.aio.AioRpcError as error:
            return _error(error)
        return JSONResponse(adapter_view(reply.adapter).model_dump())

    @router.delete(
        "/{name}",
        operation_id="delete_adapter",
        responses={**responses, 200: {"model": AdapterDeleted}},
    )
    async def delete_adapter(channels: ChannelsDep, name: AdapterName) -> Response:
        """Forget an adapter; its artefact goes once no other adapter names it."""
        try:
            await channels.adapters.DeleteAdapter(
                adapters_pb2.DeleteAdapterRequest(name=name), timeout=30
            )
        except grpc.aio.AioRpcError as error:
            return _error(error)
        return JSONResponse({"name": name, "object": "adapter", "deleted": True})

    return router
