"""InferenceService over gRPC for the remote tier: protobuf in, core events out."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, TypeAlias

from inference_remote.core import Delta, Finish, Message, RemoteInference, Request, Sampling
from slm.errors import FailedPrecondition, InvalidArgument
from slm.v1 import inference_pb2, inference_pb2_grpc, types_pb2
from slm.wire import chat_turns

# grpc ships no type information; the servicer context is untyped.
Context: TypeAlias = Any

FINISH_REASONS = {
    Finish.STOP: types_pb2.FINISH_REASON_STOP,
    Finish.LENGTH: types_pb2.FINISH_REASON_LENGTH,
    Finish.CONTENT_FILTER: types_pb2.FINISH_REASON_CONTENT_FILTER,
}


def sampling_from_proto(p: types_pb2.SamplingParams) -> Sampling:
    def opt(name: str) -> Any:
        return getattr(p, name) if p.HasField(name) else None  # type: ignore[arg-type]

    return Sampling(
        max_tokens=opt("max_tokens"),
        temperature=opt("temperature"),
        top_p=opt("top_p"),
        stop=tuple(p.stop),
        seed=opt("seed"),
        top_k=opt("top_k"),
        min_p=opt("min_p"),
        repetition_penalty=opt("repetition_penalty"),
        presence_penalty=opt("presence_penalty"),
        frequency_penalty=opt("frequency_penalty"),
        logit_bias=tuple(sorted(p.logit_bias.items())),
    )


def request_from_proto(request: inference_pb2.GenerateRequest) -> Request:
    if request.sampling.logprobs:
        raise InvalidArgument(
            "logprobs are not passed through by inference-remote", field="sampling.logprobs"
        )
    sampling = sampling_from_proto(request.sampling)
    scale = request.adapter_scale if request.HasField("adapter_scale") else None
    common: dict[str, Any] = {
        "model": request.model,
        "sampling": sampling,
        "adapter": request.adapter,
        "adapter_scale": scale,
    }
    kind = request.WhichOneof("input")
    if kind == "prompt":
        return Request(prompt=request.prompt, **common)
    if kind == "chat":
        turns = chat_turns(request.chat.messages)
        messages = tuple(Message(t.role, t.content, t.name) for t in turns)
        return Request(messages=messages, **common)
    return Request(**common)


class RemoteInferenceServicer(inference_pb2_grpc.InferenceServiceServicer):
    def __init__(self, core: RemoteInference) -> None:
        self._core = core

    async def Generate(
        self, request: inference_pb2.GenerateRequest, context: Context
    ) -> AsyncIterator[inference_pb2.GenerateResponse]:
        async for event in self._core.generate(request_from_proto(request)):
            if isinstance(event, Delta):
                yield inference_pb2.GenerateResponse(delta=types_pb2.TextDelta(text=event.text))
                continue
            usage = types_pb2.Usage(
                prompt_tokens=event.prompt_tokens,
                completion_tokens=event.completion_tokens,
                total_tokens=event.prompt_tokens + event.completion_tokens,
            )
            end = types_pb2.StreamEnd(
                finish_reason=FINISH_REASONS[event.finish],
                usage=usage,
                model=event.model,
                tier=types_pb2.TIER_EXTERNAL if event.external else types_pb2.TIER_GPU,
                upstream=event.upstream,
            )
            yield inference_pb2.GenerateResponse(end=end)

    async def ListModels(
        self, request: inference_pb2.ListModelsRequest, context: Context
    ) -> inference_pb2.ListModelsResponse:
        return inference_pb2.ListModelsResponse(
            models=[
                types_pb2.ModelInfo(
                    name=m.name,
                    owned_by="inference-remote",
                    context_length=m.context_length,
                    # "Loaded" here: at least one upstream serves it now.
                    loaded=any(u.healthy for u in m.pool.upstreams),
                )
                for m in self._core.models()
            ]
        )

    async def LoadModel(
        self, request: inference_pb2.LoadModelRequest, context: Context
    ) -> inference_pb2.LoadModelResponse:
        raise FailedPrecondition(
            "inference-remote serves the models its upstreams run; add them to "
            "inference_remote.models in the config instead"
        )

    async def UnloadModel(
        self, request: inference_pb2.UnloadModelRequest, context: Context
    ) -> inference_pb2.UnloadModelResponse:
        raise FailedPrecondition("inference-remote does not load or unload upstream models")

    async def Tokenize(
        self, request: inference_pb2.TokenizeRequest, context: Context
    ) -> inference_pb2.TokenizeResponse:
        raise FailedPrecondition("OpenAI-compatible upstreams have no standard tokenize API")

    async def Detokenize(
        self, request: inference_pb2.DetokenizeRequest, context: Context
    ) -> inference_pb2.DetokenizeResponse:
        raise FailedPrecondition("OpenAI-compatible upstreams have no standard detokenize API")

    async def Embed(
        self, request: inference_pb2.EmbedRequest, context: Context
    ) -> inference_pb2.EmbedResponse:
        raise FailedPrecondition("inference-remote does not serve embeddings yet")
