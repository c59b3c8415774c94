"""POST /v1/embeddings: OpenAI's embeddings API over DoormanService.Embed."""

from __future__ import annotations

import base64
import struct
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, Literal

import grpc
from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema
from starlette.responses import JSONResponse, Response

from gateway import errors
from gateway.channels import ChannelsDep
from gateway.protocol import ErrorResponse, request_body_doc
from gateway.serving import CallContext
from slm.v1 import doorman_pb2

MAX_INPUTS = 256

# The route checks these bounds itself (one message for both forms); the schema states them.
Inputs = Annotated[
    str | list[str],
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string", "minLength": 1},
                {
                    "type": "array",
                    "items": {"type": "string", "minLength": 1},
                    "minItems": 1,
                    "maxItems": MAX_INPUTS,
                },
            ]
        }
    ),
]


class EmbeddingsBody(BaseModel):
    # A field not listed (e.g. `dimensions`) is refused with a 400 naming it, never ignored.
    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={
            "examples": [
                {"model": "gemma-3-270m", "input": "The quick brown fox"},
                {"model": "gemma-3-270m", "input": ["first text", "second text"]},
            ]
        },
    )

    model: str = Field(min_length=1)
    input: Inputs
    encoding_format: Literal["float", "base64"] = "float"
    user: str | None = None


def encode(values: list[float], fmt: str) -> list[float] | str:
    if fmt == "base64":
        # OpenAI's base64 format: little-endian float32.
        return base64.b64encode(struct.pack(f"<{len(values)}f", *values)).decode()
    return values


ROUTE = "/v1/embeddings"


def embeddings_router(
    read_body: Callable[[Request], Awaitable[bytes]],
    context: Callable[[Request, str], CallContext],
) -> APIRouter:
    """POST /v1/embeddings over the Doorman stub of the app's channels."""
    router = APIRouter()
    responses: dict[int | str, dict[str, Any]] = {
        s: {"model": ErrorResponse} for s in (400, 401, 403, 404, 429, 500, 503)
    }

    @router.post(ROUTE, responses=responses, openapi_extra=request_body_doc(EmbeddingsBody))
    async def embeddings(request: Request, channels: ChannelsDep) -> Response:
        """One embedding per input string, from a model loaded with embeddings enabled."""
        body = errors.validated(EmbeddingsBody, await read_body(request))
        inputs = [body.input] if isinstance(body.input, str) else body.input
        if not inputs or len(inputs) > MAX_INPUTS or any(not i for i in inputs):
            return errors.invalid_request(
                f"input takes 1 to {MAX_INPUTS} non-empty strings", "input"
            ).response()
        ctx = context(request, ROUTE)
        try:
            reply = await channels.doorman.Embed(
                doorman_pb2.DoormanServiceEmbedRequest(model=body.model, inputs=inputs),
                metadata=ctx.metadata,
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
        # The edge middleware adds the request id header, as on every route.
        return JSONResponse({"object": "list", "data": data, "model": body.model, "usage": usage})

    return router
