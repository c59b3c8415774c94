"""Admin REST endpoints for inference-local's models: /admin/models (list, load, unload) and
/admin/manifest (apply a model manifest: every model with its tier).

Each addresses every inference-local replica (fan-out) and reports per replica: a model loaded
on one replica of N would serve one request in N.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Annotated, Any, Generic, Literal, Protocol, TypeVar

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
_INT32_MAX = (1 << 31) - 1
_UINT64_MAX = (1 << 64) - 1
MAX_TEXT = 4096
# A chat template is a whole Jinja program.
MAX_TEMPLATE = 1 << 20
MAX_MANIFEST_MODELS = 256

TIERS: Mapping[str, types_pb2.ModelTier.ValueType] = {
    "resident": types_pb2.MODEL_TIER_RESIDENT,
    "standby": types_pb2.MODEL_TIER_STANDBY,
    "remote": types_pb2.MODEL_TIER_REMOTE,
    "on_demand": types_pb2.MODEL_TIER_ON_DEMAND,
}
_TIER_NAMES = {value: name for name, value in TIERS.items()}
_STATE_NAMES: Mapping[types_pb2.ModelState.ValueType, str] = {
    types_pb2.MODEL_STATE_UNLOADED: "unloaded",
    types_pb2.MODEL_STATE_MAPPED: "mapped",
    types_pb2.MODEL_STATE_READY: "ready",
}


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


ModelName = Annotated[str, Field(min_length=1, max_length=MAX_TEXT)]


class ManifestModelBody(BaseModel):
    """One model of PUT /admin/manifest: an entry of inference_local.models[] with its tier."""

    model_config = ConfigDict(extra="forbid", strict=True)

    name: ModelName
    # A GGUF inside one of inference-local's model directories.
    path: str = Field(min_length=1, max_length=MAX_TEXT)
    # PyPI model package (its module, *_gguf) that assembles the file when it is missing.
    package: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_]{1,100}_gguf$")
    # Unset or 0 take inference-local's defaults.
    context_length: int | None = Field(default=None, ge=0, le=_UINT32_MAX)
    parallel: int | None = Field(default=None, ge=0, le=256)
    chat_template: str | None = Field(default=None, max_length=MAX_TEMPLATE)
    n_threads: int | None = Field(default=None, ge=0, le=_UINT32_MAX)
    quantization: str | None = Field(default=None, max_length=64)
    embeddings: bool = False
    # true: llama.cpp's repacked CPU weight layout; false: the replica's default (repacked,
    # unless it is batch-invariant).
    repack_weights: bool = False
    # -1: every layer on the GPU, 0: none; unset: llama.cpp's default.
    gpu_layers: int | None = Field(default=None, ge=-1, le=_INT32_MAX)
    backend_sampling: bool | None = None
    # llama.cpp contexts sharing the slots, each with its own decode thread; unset or 0: 1.
    decode_contexts: int | None = Field(default=None, ge=0, le=16)
    tier: Literal["resident", "standby", "remote", "on_demand"]
    # Router models whose requests make this (standby or on_demand) model ready at once.
    co_activation: list[ModelName] = Field(default=[], max_length=MAX_MANIFEST_MODELS)

    def message(self) -> inference_pb2.ManifestModel:
        return inference_pb2.ManifestModel(
            name=self.name,
            path=self.path,
            package=self.package or "",
            context_length=self.context_length or 0,
            parallel=self.parallel or 0,
            chat_template=self.chat_template,
            n_threads=self.n_threads or 0,
            quantization=self.quantization or "",
            embeddings=self.embeddings,
            repack_weights=self.repack_weights,
            gpu_layers=self.gpu_layers,
            backend_sampling=self.backend_sampling,
            decode_contexts=self.decode_contexts or 0,
            tier=TIERS[self.tier],
            co_activation=self.co_activation,
        )


class ApplyManifestBody(BaseModel):
    """PUT /admin/manifest: the whole manifest, which replaces the one each replica serves."""

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={
            # A router kept in memory and its specialist mapped, warmed by the router's
            # requests. The files are the operator's own: a fuzzer trying the example on a
            # live mesh finds neither, so it never replaces that mesh's models.
            "examples": [
                {
                    "models": [
                        {"name": "router", "path": "router-q4_k_m.gguf", "tier": "resident"},
                        {
                            "name": "specialist",
                            "path": "specialist-q4_k_m.gguf",
                            "tier": "standby",
                            "co_activation": ["router"],
                        },
                    ],
                    "resident_budget_mb": 4096,
                    "dry_run": True,
                }
            ]
        },
    )

    models: list[ManifestModelBody] = Field(min_length=1, max_length=MAX_MANIFEST_MODELS)
    # Tier budgets in MiB; unset keeps each replica's configured ones.
    resident_budget_mb: int | None = Field(default=None, ge=1, le=_UINT64_MAX)
    standby_budget_mb: int | None = Field(default=None, ge=0, le=_UINT64_MAX)
    # Validate and report what would change; change nothing.
    dry_run: bool = False
    # How long generations in flight may take to finish; unset: the configured bound.
    drain_timeout_s: float | None = Field(default=None, gt=0, le=86400.0, allow_inf_nan=False)

    def message(self) -> inference_pb2.ApplyManifestRequest:
        return inference_pb2.ApplyManifestRequest(
            models=[m.message() for m in self.models],
            resident_budget_mb=self.resident_budget_mb,
            standby_budget_mb=self.standby_budget_mb,
            dry_run=self.dry_run,
            drain_timeout_s=self.drain_timeout_s,
        )


def inline_body_doc(model: type[BaseModel]) -> dict[str, Any]:
    """request_body_doc for a body that nests models: their schemas written in place, so the
    route documents itself without the app listing them."""
    schema = model.model_json_schema(mode="validation")
    defs = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return inline(
                    {
                        **defs[ref.removeprefix("#/$defs/")],
                        **{k: v for k, v in node.items() if k != "$ref"},
                    }
                )
            return {k: inline(v) for k, v in node.items()}
        if isinstance(node, list):
            return [inline(v) for v in node]
        return node

    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": inline(schema)}},
        }
    }


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
        # Where the manifest keeps it and what of it is in memory (None where unset).
        "tier": _TIER_NAMES.get(m.tier),
        "state": _STATE_NAMES.get(m.state),
        "memory_bytes": m.memory_bytes,
        "co_activation": list(m.co_activation),
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


class Listing(Protocol):
    """A reply that lists models: ListModelsResponse, ApplyManifestResponse."""

    @property
    def models(self) -> Sequence[types_pb2.ModelInfo]: ...


def merge_listings(outcomes: Sequence[Outcome[Listing]]) -> list[dict[str, Any]]:
    """One entry per model name: the first listing replica's metadata, `loaded` when any
    replica has it in memory, `state` the most of it any replica holds, `memory_bytes` what
    all replicas hold together, and `replicas` saying which replica holds it, whether loaded,
    and its state and memory there."""
    merged: dict[str, dict[str, Any]] = {}
    states: dict[str, types_pb2.ModelState.ValueType] = {}
    for outcome in outcomes:
        if outcome.reply is None:
            continue
        for model in outcome.reply.models:
            view = merged.get(model.name)
            if view is None:
                view = merged[model.name] = {**model_view(model), "replicas": []}
                states[model.name] = model.state
            else:
                view["memory_bytes"] += model.memory_bytes
                # The enum counts up from UNLOADED to READY.
                states[model.name] = max(states[model.name], model.state)
                view["state"] = _STATE_NAMES.get(states[model.name])
            view["loaded"] = bool(view["loaded"] or model.loaded)
            view["replicas"].append(
                {
                    "address": outcome.address,
                    "loaded": model.loaded,
                    "state": _STATE_NAMES.get(model.state),
                    "memory_bytes": model.memory_bytes,
                }
            )
    return list(merged.values())


def manifest_report(outcome: Outcome[inference_pb2.ApplyManifestResponse]) -> dict[str, Any]:
    """One replica's line in PUT /admin/manifest's report: what changed there, and its models."""
    reply = outcome.reply
    if reply is None:
        return replica_view(outcome)
    return replica_view(
        outcome,
        added=list(reply.added),
        removed=list(reply.removed),
        changed=list(reply.changed),
        kept=list(reply.kept),
        drain_seconds=reply.drain_seconds,
        models=[model_view(m) for m in reply.models],
    )


def models_router() -> APIRouter:
    """The /admin/models and /admin/manifest routes (the admin router guards them). Each
    addresses every inference-local replica and reports per replica: a model loaded on one
    replica of N would serve one request in N, and a listing of one replica hides what the
    others hold."""
    router = APIRouter()
    responses: dict[int | str, dict[str, Any]] = {
        s: {"model": ErrorResponse} for s in (400, 401, 403, 404, 429, 500, 502, 503)
    }

    @router.get("/models", responses=responses)
    async def list_models(channels: ChannelsDep) -> Response:
        """Every model each inference-local replica knows, configured or loaded, with GGUF
        metadata, its manifest tier and co_activation, its state (unloaded, mapped, ready) and
        the memory it holds; `replicas` says which replica holds each, whether it is loaded
        there, and its state and memory there."""
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

    @router.post("/models/load", responses=responses, openapi_extra=request_body_doc(LoadModelBody))
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

    @router.post(
        "/models/unload", responses=responses, openapi_extra=request_body_doc(UnloadModelBody)
    )
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

    @router.put(
        "/manifest",
        # 409: another apply is in progress there; 504: the drain outlasted its bound.
        responses={**responses, **{s: {"model": ErrorResponse} for s in (409, 504)}},
        openapi_extra=inline_body_doc(ApplyManifestBody),
    )
    async def apply_manifest(request: Request, channels: ChannelsDep) -> Response:
        """Replace the model manifest (every model inference-local serves, with its tier:
        resident, standby, remote or on_demand) on every replica. Each replica checks it whole
        first (files, co_activation names, each tier's memory budget: a refusal names the
        numbers), lets the generations in flight finish, then switches. 200 only when every
        replica applied it, with what was added, removed, changed and kept on each; with
        `dry_run`, what would change, and nothing does."""
        body = errors.validated(ApplyManifestBody, await request.body())
        replicas = await replicas_of(channels)
        message = body.message()
        # Loads take as long as /models/load's, after the drain.
        timeout = LOAD_TIMEOUT_S + (body.drain_timeout_s or 0.0)
        outcomes = await fan_out(
            replicas, lambda stub: stub.ApplyManifest(message, timeout=timeout)
        )
        action = "checking the manifest" if body.dry_run else "applying the manifest"
        if any(o.error is not None for o in outcomes):
            return failure(action, outcomes)
        return JSONResponse(
            {
                "object": "manifest",
                "dry_run": body.dry_run,
                "data": merge_listings(outcomes),
                "replicas": [manifest_report(o) for o in outcomes],
            }
        )

    return router
