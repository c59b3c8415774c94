"""Admin REST endpoints for inference-local's models: /admin/models (list, load, unload)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import grpc
from fastapi import APIRouter, FastAPI, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.responses import JSONResponse, Response

from gateway import errors
from gateway.admin import AdminGuard
from gateway.config import GatewaySettings
from gateway.protocol import ErrorResponse
from slm.server import open_channel
from slm.v1 import inference_pb2, inference_pb2_grpc, types_pb2

LOAD_TIMEOUT_S = 1800.0  # quantize-on-load of a big model takes minutes


class LoadModelBody(BaseModel):
    """POST /admin/models/load."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    path: str = Field(min_length=1)
    context_length: int = Field(default=0, ge=0)
    parallel: int = Field(default=0, ge=0, le=256)
    quantization: str = ""
    pinned: bool = False
    embeddings: bool = False


class UnloadModelBody(BaseModel):
    """POST /admin/models/unload."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)


def model_view(m: types_pb2.ModelInfo) -> dict[str, Any]:
    return {
        "id": m.name,
        "object": "model",
        "owned_by": m.owned_by,
        "loaded": m.loaded,
        "context_length": m.context_length,
        "architecture": m.architecture,
        "size_bytes": m.size_bytes,
        "has_chat_template": m.has_chat_template,
        "pinned": m.pinned,
        "embeddings": m.embeddings,
    }


class _Engine:
    stub: inference_pb2_grpc.InferenceServiceStub | None = None


def models_router(settings: GatewaySettings) -> APIRouter:
    """The /admin/models routes, guarded by the admin key, with their channel's lifespan."""
    guard = AdminGuard(settings.gateway)
    engine = _Engine()

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        channel = open_channel(settings.gateway.inference_local, settings.telemetry)
        engine.stub = inference_pb2_grpc.InferenceServiceStub(channel)
        try:
            yield
        finally:
            engine.stub = None
            await channel.close(grace=None)

    router = APIRouter(prefix="/admin/models", tags=["admin"], lifespan=lifespan)
    responses: dict[int | str, dict[str, Any]] = {
        s: {"model": ErrorResponse} for s in (400, 401, 403, 404, 429, 500, 503)
    }

    def stub() -> inference_pb2_grpc.InferenceServiceStub:
        if engine.stub is None:
            raise RuntimeError("the gateway is not started: its lifespan has not run")
        return engine.stub

    def parse(model: type[BaseModel], raw: bytes) -> BaseModel | Response:
        try:
            return model.model_validate_json(raw)
        except ValidationError as error:
            first = error.errors()[0]
            param = ".".join(str(p) for p in first["loc"]) or None
            return errors.invalid_request(str(first["msg"]), param).response()

    @router.get("", responses=responses)
    async def list_models(request: Request) -> Response:
        """Every model inference-local knows: configured and loaded, with GGUF metadata."""
        if denied := guard.check(request):
            return denied.response()
        try:
            reply = await stub().ListModels(inference_pb2.ListModelsRequest(), timeout=30)
        except grpc.aio.AioRpcError as error:
            return errors.from_grpc(error).response()
        return JSONResponse({"object": "list", "data": [model_view(m) for m in reply.models]})

    @router.post("/load", responses=responses)
    async def load(request: Request) -> Response:
        """Load a GGUF from the model directories under a name (quantizing it first if asked)."""
        if denied := guard.check(request):
            return denied.response()
        body = parse(LoadModelBody, await request.body())
        if isinstance(body, Response):
            return body
        assert isinstance(body, LoadModelBody)
        message = inference_pb2.LoadModelRequest(**body.model_dump())
        try:
            reply = await stub().LoadModel(message, timeout=LOAD_TIMEOUT_S)
        except grpc.aio.AioRpcError as error:
            return errors.from_grpc(error).response()
        return JSONResponse(model_view(reply.model))

    @router.post("/unload", responses=responses)
    async def unload(request: Request) -> Response:
        """Unload a model once its running sequences have been failed or finished."""
        if denied := guard.check(request):
            return denied.response()
        body = parse(UnloadModelBody, await request.body())
        if isinstance(body, Response):
            return body
        assert isinstance(body, UnloadModelBody)
        try:
            await stub().UnloadModel(inference_pb2.UnloadModelRequest(name=body.name), timeout=60)
        except grpc.aio.AioRpcError as error:
            return errors.from_grpc(error).response()
        return JSONResponse({"id": body.name, "object": "model", "loaded": False})

    return router
