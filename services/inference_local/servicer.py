"""InferenceService over gRPC for the llama.cpp engine: protobuf in, engine events out."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, TypeAlias

from inference_local.chat_template import Message
from inference_local.engine import Delta, Engine, Finish, Request, Sampling
from slm.errors import InvalidArgument
from slm.v1 import inference_pb2, inference_pb2_grpc, types_pb2

# grpc ships no type information; the servicer context is untyped.
Context: TypeAlias = Any

ROLE_NAMES = {
    types_pb2.ROLE_SYSTEM: "system",
    types_pb2.ROLE_USER: "user",
    types_pb2.ROLE_ASSISTANT: "assistant",
    types_pb2.ROLE_TOOL: "tool",
}
FINISH_REASONS = {
    Finish.STOP: types_pb2.FINISH_REASON_STOP,
    Finish.LENGTH: types_pb2.FINISH_REASON_LENGTH,
    Finish.CANCELLED: types_pb2.FINISH_REASON_CANCELLED,
}


def sampling_from_proto(params: types_pb2.SamplingParams) -> Sampling:
    defaults = Sampling()
    return Sampling(
        max_tokens=params.max_tokens if params.HasField("max_tokens") else None,
        temperature=params.temperature if params.HasField("temperature") else defaults.temperature,
        top_p=params.top_p if params.HasField("top_p") else defaults.top_p,
        stop=tuple(params.stop),
        seed=params.seed if params.HasField("seed") else None,
    )


def request_from_proto(request: inference_pb2.GenerateRequest) -> Request:
    if not request.model:
        raise InvalidArgument("model is required", field="model")
    sampling = sampling_from_proto(request.sampling)
    kind = request.WhichOneof("input")
    if kind == "prompt":
        return Request(model=request.model, sampling=sampling, prompt=request.prompt)
    if kind == "chat":
        messages = []
        for i, m in enumerate(request.chat.messages):
            role = ROLE_NAMES.get(m.role)
            if role is None:
                raise InvalidArgument(f"messages[{i}].role is not set", field=f"messages[{i}].role")
            messages.append(Message(role, m.content))
        return Request(model=request.model, sampling=sampling, messages=tuple(messages))
    raise InvalidArgument("one of prompt or chat is required", field="input")


class InferenceServicer(inference_pb2_grpc.InferenceServiceServicer):
    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    async def Generate(
        self, request: inference_pb2.GenerateRequest, context: Context
    ) -> AsyncIterator[inference_pb2.GenerateResponse]:
        async for event in self._engine.generate(request_from_proto(request)):
            if isinstance(event, Delta):
                yield inference_pb2.GenerateResponse(delta=types_pb2.TextDelta(text=event.text))
            else:
                usage = types_pb2.Usage(
                    prompt_tokens=event.prompt_tokens,
                    completion_tokens=event.completion_tokens,
                    total_tokens=event.prompt_tokens + event.completion_tokens,
                )
                end = types_pb2.StreamEnd(
                    finish_reason=FINISH_REASONS[event.finish],
                    usage=usage,
                    model=event.model,
                    tier=types_pb2.TIER_LOCAL,
                )
                yield inference_pb2.GenerateResponse(end=end)

    async def ListModels(
        self, request: inference_pb2.ListModelsRequest, context: Context
    ) -> inference_pb2.ListModelsResponse:
        return inference_pb2.ListModelsResponse(
            models=[
                types_pb2.ModelInfo(
                    name=m.name,
                    owned_by="inference-local",
                    context_length=m.context_length,
                    loaded=m.loaded,
                )
                for m in self._engine.models()
            ]
        )
