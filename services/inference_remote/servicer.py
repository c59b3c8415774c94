"""InferenceService over gRPC for the remote tier: protobuf in, core events out."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, TypeAlias

from inference_remote.core import (
    Constraint,
    Delta,
    Finish,
    Message,
    RemoteInference,
    Request,
    Sampling,
    Tool,
    ToolCall,
    ToolChoice,
)
from slm.errors import FailedPrecondition, InvalidArgument, Unimplemented
from slm.v1 import inference_pb2, inference_pb2_grpc, types_pb2
from slm.wire import EndedChoice, chat_turns, stream_end

# grpc ships no type information; the servicer context is untyped.
Context: TypeAlias = Any

FINISH_REASONS = {
    Finish.STOP: types_pb2.FINISH_REASON_STOP,
    Finish.LENGTH: types_pb2.FINISH_REASON_LENGTH,
    Finish.CONTENT_FILTER: types_pb2.FINISH_REASON_CONTENT_FILTER,
    Finish.TOOL_CALLS: types_pb2.FINISH_REASON_TOOL_CALLS,
}

TOOL_CHOICES: dict[int, Any] = {
    types_pb2.TOOL_CHOICE_MODE_NONE: "none",
    types_pb2.TOOL_CHOICE_MODE_AUTO: "auto",
    types_pb2.TOOL_CHOICE_MODE_REQUIRED: "required",
    types_pb2.TOOL_CHOICE_MODE_FUNCTION: "function",
}

GRAMMAR_SYNTAXES = {types_pb2.GRAMMAR_SYNTAX_GBNF, types_pb2.GRAMMAR_SYNTAX_LARK}


def constraint_from_proto(p: types_pb2.OutputConstraint) -> Constraint | None:
    kind = p.WhichOneof("kind")
    if kind is None:
        return None
    if kind == "json_object":
        return Constraint("json_object")
    if kind == "json_schema":
        schema = p.json_schema
        return Constraint(
            "json_schema", schema=schema.schema, name=schema.name, strict=schema.strict
        )
    if kind == "regex":
        if not p.regex:
            raise InvalidArgument("the regex is empty", field="sampling.constraint.regex")
        return Constraint("regex", pattern=p.regex)
    if kind == "choice":
        return Constraint("choice", choices=tuple(p.choice.choices))
    if p.grammar.syntax not in GRAMMAR_SYNTAXES or not p.grammar.source:
        raise InvalidArgument(
            "a grammar needs its syntax and source", field="sampling.constraint.grammar"
        )
    # vLLM tells GBNF from Lark by the text itself, so the syntax travels implicitly.
    return Constraint("grammar", pattern=p.grammar.source)


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
        constraint=constraint_from_proto(p.constraint) if p.HasField("constraint") else None,
        n=opt("n"),
    )


def tools_from_proto(spec: types_pb2.ToolSpec) -> dict[str, Any]:
    choice = None
    if spec.choice.mode != types_pb2.TOOL_CHOICE_MODE_UNSPECIFIED:
        mode = TOOL_CHOICES.get(spec.choice.mode)
        if mode is None:
            raise InvalidArgument(
                f"unknown tool choice mode {spec.choice.mode}", field="tools.choice.mode"
            )
        choice = ToolChoice(mode, spec.choice.function_name)
    elif spec.choice.function_name:
        raise InvalidArgument(
            "function_name needs mode TOOL_CHOICE_MODE_FUNCTION", field="tools.choice.mode"
        )
    return {
        "tools": tuple(Tool(t.name, t.description, t.parameters, t.strict) for t in spec.tools),
        "tool_choice": choice,
        "parallel_tool_calls": (
            spec.parallel_tool_calls if spec.HasField("parallel_tool_calls") else None
        ),
    }


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
        **tools_from_proto(request.tools),
    }
    kind = request.WhichOneof("input")
    if kind == "prompt":
        return Request(prompt=request.prompt, **common)
    if kind == "chat":
        turns = chat_turns(request.chat.messages)
        messages = tuple(
            Message(
                t.role,
                t.content,
                t.name,
                tuple(ToolCall(c.id, c.name, c.arguments) for c in t.tool_calls),
                t.tool_call_id,
            )
            for t in turns
        )
        return Request(messages=messages, **common)
    return Request(**common)


def delta_to_proto(event: Delta) -> types_pb2.TextDelta:
    return types_pb2.TextDelta(
        text=event.text,
        choice_index=event.choice_index,
        reasoning=event.reasoning,
        tool_calls=[
            types_pb2.ToolCallDelta(index=p.index, id=p.id, name=p.name, arguments=p.arguments)
            for p in event.tool_calls
        ],
    )


class RemoteInferenceServicer(inference_pb2_grpc.InferenceServiceServicer):
    def __init__(self, core: RemoteInference) -> None:
        self._core = core

    async def Generate(
        self, request: inference_pb2.GenerateRequest, context: Context
    ) -> AsyncIterator[inference_pb2.GenerateResponse]:
        # Headers at once, before the request queues: the Doorman tells a busy upstream (a
        # late first token after them) from a dead one (nothing at all).
        await context.send_initial_metadata(())
        async for event in self._core.generate(request_from_proto(request)):
            if isinstance(event, Delta):
                yield inference_pb2.GenerateResponse(delta=delta_to_proto(event))
                continue
            choices = [
                EndedChoice(c.index, FINISH_REASONS[c.finish], c.completion_tokens, c.stop_sequence)
                for c in event.choices
            ] or [
                EndedChoice(
                    0, FINISH_REASONS[event.finish], event.completion_tokens, event.stop_sequence
                )
            ]
            end = stream_end(
                choices,
                prompt_tokens=event.prompt_tokens,
                completion_tokens=event.completion_tokens,
                model=event.model,
                tier=types_pb2.TIER_EXTERNAL if event.external else types_pb2.TIER_GPU,
                upstream=event.upstream,
            )
            yield inference_pb2.GenerateResponse(end=end)

    async def CountTokens(
        self, request: inference_pb2.CountTokensRequest, context: Context
    ) -> inference_pb2.CountTokensResponse:
        generate = inference_pb2.GenerateRequest(model=request.model, tools=request.tools)
        if request.HasField("chat"):
            generate.chat.CopyFrom(request.chat)
        elif request.HasField("prompt"):
            generate.prompt = request.prompt
        count = await self._core.count_tokens(request_from_proto(generate))
        return inference_pb2.CountTokensResponse(prompt_tokens=count)

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
                    tier=types_pb2.MODEL_TIER_REMOTE,
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

    async def ApplyManifest(
        self, request: inference_pb2.ApplyManifestRequest, context: Context
    ) -> inference_pb2.ApplyManifestResponse:
        raise Unimplemented(
            "inference-remote has no model manifest: its models are inference_remote.models"
        )

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
