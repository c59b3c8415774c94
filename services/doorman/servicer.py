"""DoormanService over gRPC: turns Chat/Complete into a generation and streams it back."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any, TypeAlias

from doorman.auth import Authenticator
from doorman.core import CallInfo, Doorman
from slm.errors import InvalidArgument
from slm.logs import request_id_var
from slm.v1 import doorman_pb2, doorman_pb2_grpc, inference_pb2, types_pb2

# grpc ships no type information; the servicer context is untyped.
Context: TypeAlias = Any


# Cache-Control request directives that keep a request off the result cache: the answer must be
# fresh (no-cache, max-age=0) or must not be kept (no-store). Others do not concern this cache.
_BYPASS_DIRECTIVES = frozenset({"no-cache", "no-store", "max-age=0"})


def _bypasses_cache(cache_control: str) -> bool:
    directives = {part.strip().lower().replace(" ", "") for part in cache_control.split(",")}
    return not directives.isdisjoint(_BYPASS_DIRECTIVES)


def _call_info(context: Context, operation: str) -> CallInfo:
    authorization = None
    bypass = False
    for key, value in context.invocation_metadata() or ():
        if key == "authorization" and authorization is None:
            authorization = value
        elif key == "cache-control":
            bypass = bypass or _bypasses_cache(value)
    return CallInfo(
        request_id=request_id_var.get(),
        operation=operation,
        timeout_s=context.time_remaining(),
        authorization=authorization,
        cache_bypass=bypass,
    )


def _with_cache_policy(call: CallInfo, policy: doorman_pb2.CachePolicy.ValueType) -> CallInfo:
    if policy == doorman_pb2.CACHE_POLICY_BYPASS:
        return replace(call, cache_bypass=True)
    if policy != doorman_pb2.CACHE_POLICY_UNSPECIFIED:
        raise InvalidArgument(f"cache: unknown cache policy {policy}", field="cache")
    return call


class DoormanServicer(doorman_pb2_grpc.DoormanServiceServicer):
    def __init__(self, doorman: Doorman, authenticator: Authenticator) -> None:
        self._doorman = doorman
        self._authenticator = authenticator

    def _call(self, context: Context, operation: str) -> CallInfo:
        """Who calls, checked before anything of the request is read: a caller without a valid
        key learns nothing about what a valid request looks like."""
        info = _call_info(context, operation)
        return replace(info, principal=self._authenticator.authenticate(info.authorization))

    async def Chat(
        self, request: doorman_pb2.ChatRequest, context: Context
    ) -> AsyncIterator[doorman_pb2.ChatResponse]:
        call = _with_cache_policy(self._call(context, "Chat"), request.cache)
        if not request.model:
            raise InvalidArgument("model is required", field="model")
        if not request.messages:
            raise InvalidArgument("messages must not be empty", field="messages")
        generate = inference_pb2.GenerateRequest(
            model=request.model,
            chat=types_pb2.ChatInput(messages=request.messages),
            sampling=request.sampling,
            tools=request.tools,
        )
        async for response in self._doorman.generate(generate, call):
            if response.HasField("delta"):
                yield doorman_pb2.ChatResponse(delta=response.delta)
            else:
                yield doorman_pb2.ChatResponse(end=response.end)

    async def Complete(
        self, request: doorman_pb2.CompleteRequest, context: Context
    ) -> AsyncIterator[doorman_pb2.CompleteResponse]:
        call = _with_cache_policy(self._call(context, "Complete"), request.cache)
        if not request.model:
            raise InvalidArgument("model is required", field="model")
        if not request.prompt:
            raise InvalidArgument("prompt must not be empty", field="prompt")
        generate = inference_pb2.GenerateRequest(
            model=request.model, prompt=request.prompt, sampling=request.sampling
        )
        async for response in self._doorman.generate(generate, call):
            if response.HasField("delta"):
                yield doorman_pb2.CompleteResponse(delta=response.delta)
            else:
                yield doorman_pb2.CompleteResponse(end=response.end)

    async def CountTokens(
        self, request: doorman_pb2.DoormanServiceCountTokensRequest, context: Context
    ) -> doorman_pb2.DoormanServiceCountTokensResponse:
        call = self._call(context, "CountTokens")
        if not request.model:
            raise InvalidArgument("model is required", field="model")
        if not request.messages:
            raise InvalidArgument("messages must not be empty", field="messages")
        count = inference_pb2.CountTokensRequest(
            model=request.model,
            chat=types_pb2.ChatInput(messages=request.messages),
            tools=request.tools,
        )
        return doorman_pb2.DoormanServiceCountTokensResponse(
            prompt_tokens=await self._doorman.count_tokens(count, call)
        )

    async def ListModels(
        self, request: doorman_pb2.DoormanServiceListModelsRequest, context: Context
    ) -> doorman_pb2.DoormanServiceListModelsResponse:
        return doorman_pb2.DoormanServiceListModelsResponse(
            models=await self._doorman.list_models(self._call(context, "ListModels"))
        )

    async def Embed(
        self, request: doorman_pb2.DoormanServiceEmbedRequest, context: Context
    ) -> doorman_pb2.DoormanServiceEmbedResponse:
        call = self._call(context, "Embed")
        if not request.model:
            raise InvalidArgument("model is required", field="model")
        if not request.inputs:
            raise InvalidArgument("inputs must not be empty", field="inputs")
        response = await self._doorman.embed(request.model, list(request.inputs), call)
        return doorman_pb2.DoormanServiceEmbedResponse(
            embeddings=response.embeddings, prompt_tokens=response.prompt_tokens
        )
