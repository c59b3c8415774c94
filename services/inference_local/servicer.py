"""InferenceService over gRPC for the llama.cpp engine: protobuf in, engine events out."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, TypeAlias

from pydantic import ValidationError

from inference_local.chat_template import Message
from inference_local.config import ModelConfig
from inference_local.constraints import from_proto as constraint_from_proto
from inference_local.engine import (
    Delta,
    End,
    Engine,
    Finish,
    LoadSpec,
    ManifestResult,
    ModelInfo,
    Request,
)
from inference_local.sampling import (
    DEFAULT_MIN_P,
    DEFAULT_TEMPERATURE,
    DEFAULT_TOP_K,
    DEFAULT_TOP_P,
    Sampling,
)
from inference_local.tools import ChoiceMode, Tool, ToolCall, ToolChoice, ToolSpec
from slm.errors import InvalidArgument
from slm.v1 import inference_pb2, inference_pb2_grpc, types_pb2
from slm.wire import EndedChoice, chat_turns, stream_end

# grpc ships no type information; the servicer context is untyped.
Context: TypeAlias = Any

FINISH_REASONS = {
    Finish.STOP: types_pb2.FINISH_REASON_STOP,
    Finish.LENGTH: types_pb2.FINISH_REASON_LENGTH,
    Finish.CANCELLED: types_pb2.FINISH_REASON_CANCELLED,
    Finish.TOOL_CALLS: types_pb2.FINISH_REASON_TOOL_CALLS,
}

MODEL_TIERS = {
    "resident": types_pb2.MODEL_TIER_RESIDENT,
    "standby": types_pb2.MODEL_TIER_STANDBY,
    "remote": types_pb2.MODEL_TIER_REMOTE,
    "on_demand": types_pb2.MODEL_TIER_ON_DEMAND,
}
MODEL_STATES = {
    "unloaded": types_pb2.MODEL_STATE_UNLOADED,
    "mapped": types_pb2.MODEL_STATE_MAPPED,
    "ready": types_pb2.MODEL_STATE_READY,
}

CHOICE_MODES = {
    types_pb2.TOOL_CHOICE_MODE_UNSPECIFIED: ChoiceMode.AUTO,
    types_pb2.TOOL_CHOICE_MODE_NONE: ChoiceMode.NONE,
    types_pb2.TOOL_CHOICE_MODE_AUTO: ChoiceMode.AUTO,
    types_pb2.TOOL_CHOICE_MODE_REQUIRED: ChoiceMode.REQUIRED,
    types_pb2.TOOL_CHOICE_MODE_FUNCTION: ChoiceMode.FUNCTION,
}


def sampling_from_proto(p: types_pb2.SamplingParams) -> Sampling:
    def opt(name: str, default: Any) -> Any:
        return getattr(p, name) if p.HasField(name) else default  # type: ignore[arg-type]

    return Sampling(
        max_tokens=opt("max_tokens", None),
        temperature=opt("temperature", DEFAULT_TEMPERATURE),
        top_p=opt("top_p", DEFAULT_TOP_P),
        top_k=opt("top_k", DEFAULT_TOP_K),
        min_p=opt("min_p", DEFAULT_MIN_P),
        repetition_penalty=opt("repetition_penalty", 1.0),
        presence_penalty=opt("presence_penalty", 0.0),
        frequency_penalty=opt("frequency_penalty", 0.0),
        stop=tuple(p.stop),
        seed=opt("seed", None),
        logit_bias=dict(p.logit_bias),
        logprobs=p.logprobs,
        top_logprobs=p.top_logprobs,
    )


def tools_from_proto(spec: types_pb2.ToolSpec) -> ToolSpec | None:
    """The tools of a request; None when it gives none and sets no choice either (a choice
    without tools is refused later, naming tools.tools)."""
    unset = spec.choice.mode == types_pb2.TOOL_CHOICE_MODE_UNSPECIFIED
    if not spec.tools and unset and not spec.HasField("parallel_tool_calls"):
        return None
    mode = CHOICE_MODES.get(spec.choice.mode)
    if mode is None:
        raise InvalidArgument("unknown tool choice mode", field="tools.choice.mode")
    return ToolSpec(
        tools=tuple(Tool(t.name, t.description, t.parameters, t.strict) for t in spec.tools),
        choice=ToolChoice(mode, spec.choice.function_name),
        parallel=spec.parallel_tool_calls if spec.HasField("parallel_tool_calls") else True,
    )


def messages_from_proto(chat: types_pb2.ChatInput) -> tuple[Message, ...]:
    return tuple(
        Message(
            t.role,
            t.content,
            t.name,
            tuple(ToolCall(c.id, c.name, c.arguments) for c in t.tool_calls),
            t.tool_call_id,
        )
        for t in chat_turns(chat.messages)
    )


def request_from_proto(request: inference_pb2.GenerateRequest) -> Request:
    if not request.model:
        raise InvalidArgument("model is required", field="model")
    sampling = sampling_from_proto(request.sampling)
    scale = request.adapter_scale if request.HasField("adapter_scale") else None
    p = request.sampling
    common: dict[str, Any] = {
        "model": request.model,
        "sampling": sampling,
        "adapter": request.adapter,
        "adapter_scale": scale,
        "tools": tools_from_proto(request.tools),
        "constraint": constraint_from_proto(p.constraint) if p.HasField("constraint") else None,
        "n": p.n if p.HasField("n") else 1,
    }
    kind = request.WhichOneof("input")
    if kind == "prompt":
        return Request(prompt=request.prompt, **common)
    if kind == "chat":
        return Request(messages=messages_from_proto(request.chat), **common)
    raise InvalidArgument("one of prompt or chat is required", field="input")


def model_to_proto(info: ModelInfo) -> types_pb2.ModelInfo:
    return types_pb2.ModelInfo(
        name=info.name,
        owned_by="inference-local",
        context_length=info.context_length,
        loaded=info.loaded,
        architecture=info.architecture,
        size_bytes=info.size_bytes,
        has_chat_template=info.has_chat_template,
        pinned=info.pinned,
        embeddings=info.embeddings,
        tier=MODEL_TIERS[info.tier],
        state=MODEL_STATES[info.state],
        memory_bytes=info.memory_bytes,
        co_activation=info.co_activation,
    )


def manifest_from_proto(models: Any) -> list[ModelConfig]:
    """ManifestModel messages as config entries, validated as the config file's are; a bad
    entry is INVALID_ARGUMENT naming it and its field."""
    tiers = {v: k for k, v in MODEL_TIERS.items()}
    entries = []
    for i, m in enumerate(models):
        # Zero and empty mean "the default", as in LoadModelRequest: left out, so an entry
        # equals the config file's entry for the same model and is kept, not reloaded.
        given = {
            "package": m.package,
            "context_length": m.context_length,
            "parallel": m.parallel,
            "n_threads": m.n_threads,
            "quantization": m.quantization,
            "embeddings": m.embeddings,
            "repack_weights": m.repack_weights,
            "decode_contexts": m.decode_contexts,
            "co_activation": list(m.co_activation),
        }
        fields: dict[str, Any] = {
            "name": m.name,
            "path": m.path,
            **{k: v for k, v in given.items() if v},
        }
        if m.tier not in tiers and m.tier != types_pb2.MODEL_TIER_UNSPECIFIED:
            raise InvalidArgument(
                f"models[{i}].tier: unknown tier {m.tier}", field=f"models[{i}].tier"
            )
        if m.tier != types_pb2.MODEL_TIER_UNSPECIFIED:
            fields["tier"] = tiers[m.tier]
        for optional in ("chat_template", "gpu_layers", "backend_sampling"):
            if m.HasField(optional):
                fields[optional] = getattr(m, optional)
        try:
            entries.append(ModelConfig(**fields))
        except ValidationError as error:
            first = error.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            field = f"models[{i}]" + (f".{where}" if where else "")
            raise InvalidArgument(f"{field}: {first['msg']}", field=field) from None
    return entries


def manifest_result_to_proto(result: ManifestResult) -> inference_pb2.ApplyManifestResponse:
    change = result.change
    return inference_pb2.ApplyManifestResponse(
        models=[model_to_proto(m) for m in result.models],
        added=change.added,
        removed=change.removed,
        changed=change.changed,
        kept=change.kept,
        drain_seconds=result.drain_seconds,
    )


def delta_to_proto(event: Delta) -> inference_pb2.GenerateResponse:
    delta = types_pb2.TextDelta(
        text=event.text,
        choice_index=event.index,
        tool_calls=[
            types_pb2.ToolCallDelta(index=c.index, id=c.id, name=c.name, arguments=c.arguments)
            for c in event.tool_calls
        ],
    )
    for lp in event.logprobs:
        delta.logprobs.append(
            types_pb2.TokenLogprob(
                token=lp.token,
                logprob=lp.logprob,
                bytes=lp.bytes,
                top_logprobs=[
                    types_pb2.TopLogprob(token=t.token, logprob=t.logprob, bytes=t.bytes)
                    for t in lp.top
                ],
            )
        )
    return inference_pb2.GenerateResponse(delta=delta)


def end_to_proto(event: End) -> inference_pb2.GenerateResponse:
    # The engine's End lists every choice, the only one too.
    choices = [
        EndedChoice(c.index, FINISH_REASONS[c.finish], c.completion_tokens, c.stop_sequence)
        for c in event.choices
    ]
    end = stream_end(
        choices,
        prompt_tokens=event.prompt_tokens,
        completion_tokens=event.completion_tokens,
        model=event.model,
        tier=types_pb2.TIER_LOCAL,
    )
    return inference_pb2.GenerateResponse(end=end)


class InferenceServicer(inference_pb2_grpc.InferenceServiceServicer):
    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    async def Generate(
        self, request: inference_pb2.GenerateRequest, context: Context
    ) -> AsyncIterator[inference_pb2.GenerateResponse]:
        # Headers at once, before the request queues: the Doorman tells a busy upstream (a
        # late first token after them) from a dead one (nothing at all).
        await context.send_initial_metadata(())
        async for event in self._engine.generate(request_from_proto(request)):
            yield delta_to_proto(event) if isinstance(event, Delta) else end_to_proto(event)

    async def CountTokens(
        self, request: inference_pb2.CountTokensRequest, context: Context
    ) -> inference_pb2.CountTokensResponse:
        if not request.model:
            raise InvalidArgument("model is required", field="model")
        kind = request.WhichOneof("input")
        if kind is None:
            raise InvalidArgument("one of prompt or chat is required", field="input")
        count = await self._engine.count_tokens(
            request.model,
            prompt=request.prompt if kind == "prompt" else None,
            messages=messages_from_proto(request.chat) if kind == "chat" else None,
            tools=tools_from_proto(request.tools),
        )
        return inference_pb2.CountTokensResponse(prompt_tokens=count)

    async def ListModels(
        self, request: inference_pb2.ListModelsRequest, context: Context
    ) -> inference_pb2.ListModelsResponse:
        return inference_pb2.ListModelsResponse(
            models=[model_to_proto(m) for m in self._engine.models()]
        )

    async def LoadModel(
        self, request: inference_pb2.LoadModelRequest, context: Context
    ) -> inference_pb2.LoadModelResponse:
        if not request.name or not request.path:
            raise InvalidArgument(
                "name and path are required", field="name" if not request.name else "path"
            )
        info = await self._engine.load(
            LoadSpec(
                name=request.name,
                path=request.path,
                context_length=request.context_length or None,
                parallel=request.parallel or None,
                quantization=request.quantization or None,
                pinned=request.pinned,
                embeddings=request.embeddings,
            )
        )
        return inference_pb2.LoadModelResponse(model=model_to_proto(info))

    async def UnloadModel(
        self, request: inference_pb2.UnloadModelRequest, context: Context
    ) -> inference_pb2.UnloadModelResponse:
        await self._engine.unload(request.name)
        return inference_pb2.UnloadModelResponse()

    async def ApplyManifest(
        self, request: inference_pb2.ApplyManifestRequest, context: Context
    ) -> inference_pb2.ApplyManifestResponse:
        if request.HasField("drain_timeout_s") and not 0 < request.drain_timeout_s <= 86400:
            raise InvalidArgument(
                "drain_timeout_s must be above 0 and at most 86400", field="drain_timeout_s"
            )
        result = await self._engine.apply_manifest(
            manifest_from_proto(request.models),
            resident_budget_mb=(
                request.resident_budget_mb if request.HasField("resident_budget_mb") else None
            ),
            standby_budget_mb=(
                request.standby_budget_mb if request.HasField("standby_budget_mb") else None
            ),
            dry_run=request.dry_run,
            drain_timeout_s=(
                request.drain_timeout_s if request.HasField("drain_timeout_s") else None
            ),
        )
        return manifest_result_to_proto(result)

    async def Tokenize(
        self, request: inference_pb2.TokenizeRequest, context: Context
    ) -> inference_pb2.TokenizeResponse:
        tokens = await self._engine.tokenize(request.model, request.text, request.add_special)
        return inference_pb2.TokenizeResponse(tokens=tokens)

    async def Detokenize(
        self, request: inference_pb2.DetokenizeRequest, context: Context
    ) -> inference_pb2.DetokenizeResponse:
        text = await self._engine.detokenize(request.model, list(request.tokens))
        return inference_pb2.DetokenizeResponse(text=text)

    async def Embed(
        self, request: inference_pb2.EmbedRequest, context: Context
    ) -> inference_pb2.EmbedResponse:
        vectors, tokens = await self._engine.embed(request.model, list(request.inputs))
        return inference_pb2.EmbedResponse(
            embeddings=[inference_pb2.Embedding(values=v) for v in vectors], prompt_tokens=tokens
        )
