"""Admin REST endpoints for inference-local's models: /admin/models (list, load, unload).

Each addresses every inference-local replica (fan-out) and reports per replica: a model loaded
on one replica of N would serve one request in N.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Generic, TypeVar

import grpc
from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import JSONResponse, Response

from gateway import errors
from gateway.channels import ChannelsDep, Replica
from gateway.protocol import ErrorResponse, request_body_doc
from slm.v1 import inference_pb2, inference_pb2_grpc, types_pb2

LOAD_TIMEOUT_S = 1800.0  # quantize-on-load of a big model takes minutes
# What LoadModelRequest's uint32 fields can carry; inference-local refuses what does not fit.
_UINT32_MAX = (1 << 32) - 1
MAX_TEXT = 4096


class LoadModelBody(BaseModel):
    """POST /admin/models/load."""

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={
            "examples": [{"name": "gemma-3-270m", "path": "gemma-3-270m-q4_k_m.gguf"}]
        },
    )

    name: str = Field(min_length=1, max_length=MAX_TEXT)
    # A GGUF inside one of inference-local's model directories.
    path: str = Field(min_length=1, max_length=MAX_TEXT)
    # 0 takes the configured default.
    context_length: int = Field(default=0, ge=0, le=_UINT32_MAX)
    parallel: int = Field(default=0, ge=0, le=256)
    quantization: str = Field(default="", max_length=64)
    pinned: bool = False
    embeddings: bool = False


class UnloadModelBody(BaseModel):
    """POST /admin/models/unload."""

    model_config = ConfigDict(
        extra="forbid", strict=True, json_schema_extra={"examples": [{"name": "gemma-3-270m"}]}
    )

    name: str = Field(min_length=1, max_length=MAX_TEXT)


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


Reply = TypeVar("Reply")


@dataclasses.dataclass(frozen=True)
class Outcome(Generic[Reply]):
    """What one replica answered: its reply, or the error of its call."""

    address: str
    reply: Reply | None = None
    error: grpc.aio.AioRpcError | None = None


async def fan_out(
    replicas: Sequence[Replica],
    call: Callable[[inference_pb2_grpc.InferenceServiceStub], Awaitable[Reply]],
) -> list[Outcome[Reply]]:
    """`call` on every replica at once; one outcome per replica, in the replicas' order."""

    async def one(replica: Replica) -> Outcome[Reply]:
        try:
            return Outcome(replica.address, reply=await call(replica.stub))
        except grpc.aio.AioRpcError as error:
            return Outcome(replica.address, error=error)

    async with asyncio.TaskGroup() as group:
        tasks = [group.create_task(one(r)) for r in replicas]
    return [t.result() for t in tasks]


def error_view(error: grpc.aio.AioRpcError) -> dict[str, Any]:
    http = errors.from_grpc(error)
    return {
        "status": http.status,
        "type": http.type,
        "code": http.code or error.code().name.lower(),
        "message": http.message,
    }


def replica_view(outcome: Outcome[Any], **fields: Any) -> dict[str, Any]:
    """One replica's line in a report: its address, whether its call succeeded, and why not."""
    if outcome.error is not None:
        return {"address": outcome.address, "ok": False, "error": error_view(outcome.error)}
    return {"address": outcome.address, "ok": True, **fields}


def failure(action: str, outcomes: Sequence[Outcome[Any]]) -> Response:
    """The error for a fan-out some replicas failed, naming each of them.

    Replicas that agree on the failure keep its status (a path outside the model directories
    stays a 400 on every replica); replicas failing differently are a 502.
    """
    failed = [
        (o.address, o.error.code(), errors.from_grpc(o.error))
        for o in outcomes
        if o.error is not None
    ]
    assert failed, "failure() of a fan-out that succeeded"
    where = f"{len(failed)} of {len(outcomes)} replicas ({', '.join(a for a, _, _ in failed)})"
    first = failed[0][2]
    if len({code for _, code, _ in failed}) > 1:
        detail = "; ".join(f"{a}: {code.name} {http.message}" for a, code, http in failed)
        error = errors.HttpError(
            502, f"{action} failed on {where}: {detail}", errors.SERVER, "replicas_failed"
        )
    elif len({http.message for _, _, http in failed}) == 1:
        error = dataclasses.replace(first, message=f"{first.message} (on {where})")
    else:
        detail = "; ".join(f"{a}: {http.message}" for a, _, http in failed)
        error = dataclasses.replace(first, message=f"{action} failed on {where}: {detail}")
    return JSONResponse(
        {**error.body(), "replicas": [replica_view(o) for o in outcomes]},
        status_code=error.status,
        headers=error.headers(),
    )


async def replicas_of(channels: ChannelsDep) -> list[Replica]:
    """Every inference-local replica there is now; raises Refusal (503) when discovery cannot
    say or knows none."""
    try:
        replicas = await channels.inference_replicas()
    except OSError as error:
        raise errors.Refusal(
            errors.HttpError(503, f"cannot list inference-local replicas: {error}", errors.SERVER)
        ) from None
    if not replicas:
        raise errors.Refusal(
            errors.HttpError(503, "no inference-local replica is known", errors.SERVER)
        )
    return replicas


def merge_listings(
    outcomes: Sequence[Outcome[inference_pb2.ListModelsResponse]],
) -> list[dict[str, Any]]:
    """One entry per model name: the first listing replica's metadata, `loaded` when any
    replica has it in memory, and `replicas` saying which replica holds it and whether loaded."""
    merged: dict[str, dict[str, Any]] = {}
    for outcome in outcomes:
        if outcome.reply is None:
            continue
        for model in outcome.reply.models:
            view = merged.get(model.name)
            if view is None:
                view = merged[model.name] = {**model_view(model), "replicas": []}
            view["loaded"] = bool(view["loaded"] or model.loaded)
            view["replicas"].append({"address": outcome.address, "loaded": model.loaded})
    return list(merged.values())


def models_router() -> APIRouter:
    """The /admin/models routes (the admin router guards them). Each addresses every
    inference-local replica and reports per replica: a model loaded on one replica of N would
    serve one request in N, and a listing of one replica hides what the others hold."""
    router = APIRouter(prefix="/models")
    responses: dict[int | str, dict[str, Any]] = {
        s: {"model": ErrorResponse} for s in (400, 401, 403, 404, 429, 500, 502, 503)
    }

    @router.get("", responses=responses)
    async def list_models(channels: ChannelsDep) -> Response:
        """Every model each inference-local replica knows, configured or loaded, with GGUF
        metadata; `replicas` says which replica holds each and whether it is loaded there."""
        replicas = await replicas_of(channels)
        outcomes = await fan_out(
            replicas, lambda stub: stub.ListModels(inference_pb2.ListModelsRequest(), timeout=30)
        )
        if all(o.error is not None for o in outcomes):
            return failure("listing models", outcomes)
        # A replica that could not answer is reported, not hidden: its models are unknown.
        report = [replica_view(o, models=len(o.reply.models) if o.reply else 0) for o in outcomes]
        return JSONResponse(
            {"object": "list", "data": merge_listings(outcomes), "replicas": report}
        )

    @router.post("/load", responses=responses, openapi_extra=request_body_doc(LoadModelBody))
    async def load(request: Request, channels: ChannelsDep) -> Response:
        """Load a GGUF from the model directories under a name (quantizing it first if asked)
        on every inference-local replica; 200 only when every replica has it."""
        body = errors.validated(LoadModelBody, await request.body())
        replicas = await replicas_of(channels)
        message = inference_pb2.LoadModelRequest(**body.model_dump())
        outcomes = await fan_out(
            replicas, lambda stub: stub.LoadModel(message, timeout=LOAD_TIMEOUT_S)
        )
        if any(o.error is not None for o in outcomes):
            return failure(f"loading {body.name!r}", outcomes)
        first = outcomes[0].reply
        assert first is not None
        return JSONResponse(
            {**model_view(first.model), "replicas": [replica_view(o) for o in outcomes]}
        )

    @router.post("/unload", responses=responses, openapi_extra=request_body_doc(UnloadModelBody))
    async def unload(request: Request, channels: ChannelsDep) -> Response:
        """Unload a model from every replica, once its running sequences there have been failed
        or finished. A replica that does not hold it is fine; 404 when none does."""
        body = errors.validated(UnloadModelBody, await request.body())
        replicas = await replicas_of(channels)
        message = inference_pb2.UnloadModelRequest(name=body.name)
        outcomes = await fan_out(replicas, lambda stub: stub.UnloadModel(message, timeout=60))
        absent = [
            o
            for o in outcomes
            if o.error is not None and o.error.code() == grpc.StatusCode.NOT_FOUND
        ]
        if len(absent) == len(outcomes):
            return failure(f"unloading {body.name!r}", outcomes)
        # A replica that never held the model is where the caller wants it: not a failure.
        settled = [Outcome[Any](o.address) if o in absent else o for o in outcomes]
        if any(o.error is not None for o in settled):
            return failure(f"unloading {body.name!r}", settled)
        report = [replica_view(o, held=o not in absent) for o in outcomes]
        return JSONResponse(
            {"id": body.name, "object": "model", "loaded": False, "replicas": report}
        )

    return router
