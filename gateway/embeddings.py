"""POST /v1/embeddings: OpenAI's embeddings API over DoormanService.Embed."""

from __future__ import annotations

import base64
import contextlib
import struct
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

import grpc
from fastapi import APIRouter, FastAPI, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.responses import JSONResponse, Response

from gateway import errors
from gateway.config import GatewaySettings
from gateway.protocol import ErrorResponse
from slm.server import open_channel
from slm.v1 import doorman_pb2, doorman_pb2_grpc

MAX_INPUTS = 256


class EmbeddingsBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1)
    input: str | list[str] = Field(min_length=1)
    encoding_format: Literal["float", "base64"] = "float"
    user: str | None = None


def encode(values: list[float], fmt: str) -> list[float] | str:
    if fmt == "base64":
        # OpenAI's base64 format: little-endian float32.
        return base64.b64encode(struct.pack(f"<{len(values)}f", *values)).decode()
    return values


class _Doorman:
    stub: doorman_pb2_grpc.DoormanServiceStub | None = None


def embeddings_router(settings: GatewaySettings) -> APIRouter:
    doorman = _Doorman()

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        channel = open_channel(settings.gateway.doorman, settings.telemetry)
        doorman.stub = doorman_pb2_grpc.DoormanServiceStub(channel)
        try:
            yield
        finally:
            doorman.stub = None
            await channel.close(grace=None)

    router = APIRouter(lifespan=lifespan)
    responses: dict[int | str, dict[str, Any]] = {
        s: {"model": ErrorResponse} for s in (400, 401, 403, 404, 429, 500, 503)
    }

    @router.post("/v1/embeddings", responses=responses)
    async def embeddings(request: Request) -> Response:
        """One embedding per input string, from a model loaded with embeddings enabled."""
        try:
            body = EmbeddingsBody.model_validate_json(await request.body())
        except ValidationError as error:
            first = error.errors()[0]
            param = ".".join(str(p) for p in first["loc"]) or None
            return errors.invalid_request(str(first["msg"]), param).response()
        inputs = [body.input] if isinstance(body.input, str) else body.input
        if not inputs or len(inputs) > MAX_INPUTS or any(not i for i in inputs):
            return errors.invalid_request(
                f"input takes 1 to {MAX_INPUTS} non-empty strings", "input"
            ).response()
        request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
        metadata: list[tuple[str, str]] = [("x-request-id", request_id)]
        if auth := request.headers.get("authorization"):
            metadata.append(("authorization", auth))
        assert doorman.stub is not None, "the gateway's lifespan has not run"
        try:
            reply = await doorman.stub.Embed(
                doorman_pb2.DoormanServiceEmbedRequest(model=body.model, inputs=inputs),
                metadata=metadata,
                timeout=120,
            )
        except grpc.aio.AioRpcError as error:
            return errors.from_grpc(error).response()
        data = [
            {
                "object": "embedding",
                "index": i,
                "embedding": encode(list(e.values), body.encoding_format),
            }
            for i, e in enumerate(reply.embeddings)
        ]
        usage = {"prompt_tokens": reply.prompt_tokens, "total_tokens": reply.prompt_tokens}
        return JSONResponse(
            {"object": "list", "data": data, "model": body.model, "usage": usage},
            headers={"x-request-id": request_id},
        )

    return router
