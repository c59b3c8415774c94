"""Translation between OpenAI requests and the Doorman's gRPC API, including SSE streaming."""

from __future__ import annotations

import abc
import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, cast

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry, Counter, Histogram
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from gateway import errors
from gateway.errors import HttpError
from gateway.protocol import ChatCompletionRequest, CompletionRequest, _GenerationRequest
from slm.v1 import doorman_pb2, doorman_pb2_grpc, types_pb2

log = logging.getLogger(__name__)

_EOF: object = grpc.aio.EOF

ROLES: Mapping[str, types_pb2.Role.ValueType] = {
    "system": types_pb2.ROLE_SYSTEM,
    "developer": types_pb2.ROLE_SYSTEM,
    "user": types_pb2.ROLE_USER,
    "assistant": types_pb2.ROLE_ASSISTANT,
    "tool": types_pb2.ROLE_TOOL,
}

FINISH_REASONS: Mapping[types_pb2.FinishReason.ValueType, str] = {
    types_pb2.FINISH_REASON_STOP: "stop",
    types_pb2.FINISH_REASON_LENGTH: "length",
    types_pb2.FINISH_REASON_CONTENT_FILTER: "content_filter",
}

TIERS: Mapping[types_pb2.Tier.ValueType, str] = {
    types_pb2.TIER_LOCAL: "local",
    types_pb2.TIER_GPU: "gpu",
    types_pb2.TIER_EXTERNAL: "external",
}

SSE_DONE = b"data: [DONE]\n\n"
SSE_MEDIA_TYPE = "text/event-stream"
_SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}

# Seconds; TTFT spans prefill of short and long prompts, end-to-end spans whole generations.
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
E2E_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class GatewayMetrics:
    """The gateway's Prometheus instruments, registered on a registry the app factory owns."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "slm_gateway_requests",
            "HTTP requests answered, by route and status.",
            ["route", "method", "status"],
            registry=registry,
        )
        self.duration = Histogram(
            "slm_gateway_request_duration_seconds",
            "End-to-end time from request to the last byte of the response.",
            ["route"],
            buckets=E2E_BUCKETS,
            registry=registry,
        )
        self.ttft = Histogram(
            "slm_gateway_time_to_first_token_seconds",
            "Time from request to the first generated text.",
            ["route"],
            buckets=TTFT_BUCKETS,
            registry=registry,
        )
        self.prompt_tokens = Counter(
            "slm_gateway_prompt_tokens",
            "Prompt tokens of answered requests.",
            ["route"],
            registry=registry,
        )
        self.completion_tokens = Counter(
            "slm_gateway_completion_tokens",
            "Generated tokens of answered requests.",
            ["route"],
            registry=registry,
        )


@dataclass(frozen=True, slots=True)
class CallContext:
    """What one HTTP request hands to the Doorman call: ids, credentials and its connection."""

    request_id: str
    metadata: tuple[tuple[str, str], ...]
    receive: Receive
    started: float
    route: str


def call_metadata(request_id: str, authorization: str | None) -> tuple[tuple[str, str], ...]:
    """gRPC metadata for a Doorman call: the request id, and the caller's key when it sent one."""
    if authorization:
        return (("x-request-id", request_id), ("authorization", authorization))
    return (("x-request-id", request_id),)


# --- OpenAI -> protobuf -------------------------------------------------------------------------


def sampling_params(body: _GenerationRequest) -> types_pb2.SamplingParams:
    """Only fields the client set are set, so the engine's defaults apply to the rest."""
    params = types_pb2.SamplingParams(stop=[s for s in body.stop if s])
    limit = body.token_limit
    if limit is not None:
        params.max_tokens = limit
    if body.temperature is not None:
        params.temperature = body.temperature
    if body.top_p is not None:
        params.top_p = body.top_p
    if body.seed is not None:
        params.seed = body.seed
    for name in ("presence_penalty", "frequency_penalty", "top_k", "min_p", "repetition_penalty"):
        value = getattr(body, name)
        if value is not None:
            setattr(params, name, value)
    for token, bias in (body.logit_bias or {}).items():
        params.logit_bias[int(token)] = bias
    want, top = body.logprob_request
    if want:
        params.logprobs = True
        params.top_logprobs = top
    return params


def chat_request(body: ChatCompletionRequest) -> doorman_pb2.ChatRequest:
    return doorman_pb2.ChatRequest(
        model=body.model,
        messages=[
            types_pb2.ChatMessage(role=ROLES[m.role], content=m.content, name=m.name or "")
            for m in body.messages
        ],
        sampling=sampling_params(body),
    )


def completion_request(body: CompletionRequest) -> doorman_pb2.CompleteRequest:
    return doorman_pb2.CompleteRequest(
        model=body.model, prompt=body.prompt, sampling=sampling_params(body)
    )


# --- protobuf -> OpenAI -------------------------------------------------------------------------


def finish_reason(reason: types_pb2.FinishReason.ValueType) -> str:
    # CANCELLED never reaches a client that is still listening; UNSPECIFIED is a Doorman bug.
    # Both read as a plain stop rather than an invented reason OpenAI clients do not know.
    return FINISH_REASONS.get(reason, "stop")


def usage_dict(usage: types_pb2.Usage) -> dict[str, int]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens or usage.prompt_tokens + usage.completion_tokens,
    }


def slm_extension(end: types_pb2.StreamEnd) -> dict[str, Any]:
    """service-slm's own figures, as a top-level "slm" object on the final chunk or response.

    Which tier and upstream served the answer, and how much personal data of each type the
    Doorman masked before the request left and restored in the answer. OpenAI clients ignore
    unknown top-level fields, so this is safe to send to all of them.
    """
    return {
        "tier": TIERS.get(end.tier),
        "upstream": end.upstream or None,
        "masked_entities": dict(end.masked_entities),
        "hops": [
            {
                "model": h.model,
                "tier": TIERS.get(h.tier),
                "upstream": h.upstream,
                "intent": h.intent,
            }
            for h in end.hops
        ],
    }


def sse(payload: Mapping[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


class ResponseFormat(abc.ABC):
    """How one endpoint spells its response and its stream chunks.

    The content chunk is sent once per token, so its JSON is a prebuilt prefix and suffix around
    the one string that changes.
    """

    object_name: str
    chunk_object: str
    id_prefix: str
    # The JSON around the text of a content chunk's only choice.
    _delta_open: str
    _delta_close: str

    def __init__(self, request_id: str, model: str, include_usage: bool) -> None:
        self.id = self.id_prefix + request_id
        self.model = model
        self.created = int(time.time())
        self.include_usage = include_usage
        head = {"id": self.id, "object": self.chunk_object, "created": self.created, "model": model}
        self._head = head
        head_json = json.dumps(head, separators=(",", ":"))[:-1]
        usage_tail = ',"usage":null' if include_usage else ""
        self._delta_prefix = ("data: " + head_json + self._delta_open).encode()
        tail = self._delta_close + ',"logprobs":null,"finish_reason":null}]' + usage_tail + "}\n\n"
        self._delta_suffix = tail.encode()

    @abc.abstractmethod
    def _choice(self, text: str | None, reason: str | None) -> dict[str, Any]:
        """One choice of a chunk."""

    def opening(self) -> bytes | None:
        """A chunk to send before any text, if the endpoint has one."""
        return None

    def delta(self, text: str) -> bytes:
        return self._delta_prefix + json.dumps(text).encode() + self._delta_suffix

    def _chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        chunk = {**self._head, "choices": choices}
        if self.include_usage:
            chunk["usage"] = None
        return chunk

    def finish(self, reason: str, end: types_pb2.StreamEnd | None = None) -> bytes:
        chunk = self._chunk([self._choice(None, reason)])
        if end is not None:
            chunk["slm"] = slm_extension(end)
        return sse(chunk)

    def usage(self, usage: types_pb2.Usage) -> bytes:
        return sse({**self._head, "choices": [], "usage": usage_dict(usage)})

    @abc.abstractmethod
    def complete(
        self, text: str, end: types_pb2.StreamEnd, logprobs: LogprobList = ()
    ) -> dict[str, Any]:
        """The whole, non-streamed response."""

    @abc.abstractmethod
    def logprobs_json(self, logprobs: LogprobList) -> dict[str, Any]:
        """OpenAI's logprobs object of one choice, for these tokens."""

    def delta_with_logprobs(self, text: str, logprobs: LogprobList) -> bytes:
        """A content chunk carrying logprobs: the slow path, taken only when they were asked."""
        choice = self._choice(text, None)
        choice["logprobs"] = self.logprobs_json(logprobs)
        return sse(self._chunk([choice]))


LogprobList = Sequence[types_pb2.TokenLogprob]


def _token_entry(lp: types_pb2.TokenLogprob | types_pb2.TopLogprob) -> dict[str, Any]:
    return {"token": lp.token, "logprob": lp.logprob, "bytes": list(lp.bytes)}


class ChatFormat(ResponseFormat):
    object_name = "chat.completion"
    chunk_object = "chat.completion.chunk"
    id_prefix = "chatcmpl-"

    _delta_open = ',"choices":[{"index":0,"delta":{"content":'
    _delta_close = "}"

    def _choice(self, text: str | None, reason: str | None) -> dict[str, Any]:
        delta = {} if text is None else {"content": text}
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}

    def opening(self) -> bytes:
        choice = {
            "index": 0,
            "delta": {"role": "assistant", "content": ""},
            "logprobs": None,
            "finish_reason": None,
        }
        return sse(self._chunk([choice]))

    def logprobs_json(self, logprobs: LogprobList) -> dict[str, Any]:
        return {
            "content": [
                {**_token_entry(lp), "top_logprobs": [_token_entry(t) for t in lp.top_logprobs]}
                for lp in logprobs
            ]
        }

    def complete(
        self, text: str, end: types_pb2.StreamEnd, logprobs: LogprobList = ()
    ) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": self.object_name,
            "created": self.created,
            "model": end.model or self.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": self.logprobs_json(logprobs) if logprobs else None,
                    "finish_reason": finish_reason(end.finish_reason),
                }
            ],
            "usage": usage_dict(end.usage),
        }


class CompletionFormat(ResponseFormat):
    object_name = "text_completion"
    # OpenAI uses the same object name for completion chunks.
    chunk_object = "text_completion"
    id_prefix = "cmpl-"

    _delta_open = ',"choices":[{"index":0,"text":'
    _delta_close = ""

    def _choice(self, text: str | None, reason: str | None) -> dict[str, Any]:
        return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}

    _offset = 0

    def logprobs_json(self, logprobs: LogprobList) -> dict[str, Any]:
        # The legacy completions shape: parallel lists, offsets into the generated text.
        offsets = []
        for lp in logprobs:
            offsets.append(self._offset)
            self._offset += len(lp.token)
        return {
            "tokens": [lp.token for lp in logprobs],
            "token_logprobs": [lp.logprob for lp in logprobs],
            "top_logprobs": [{t.token: t.logprob for t in lp.top_logprobs} for lp in logprobs],
            "text_offset": offsets,
        }

    def complete(
        self, text: str, end: types_pb2.StreamEnd, logprobs: LogprobList = ()
    ) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": self.object_name,
            "created": self.created,
            "model": end.model or self.model,
            "choices": [
                {
                    "index": 0,
                    "text": text,
                    "logprobs": self.logprobs_json(logprobs) if logprobs else None,
                    "finish_reason": finish_reason(end.finish_reason),
                }
            ],
            "usage": usage_dict(end.usage),
        }


# --- the call -----------------------------------------------------------------------------------


class GenerationEvent(Protocol):
    """ChatResponse and CompleteResponse: a oneof of delta and end."""

    @property
    def delta(self) -> types_pb2.TextDelta: ...

    @property
    def end(self) -> types_pb2.StreamEnd: ...

    def WhichOneof(self, oneof_group: Any) -> str | None: ...


class GenerationCall(Protocol):
    """The part of a grpc.aio UnaryStreamCall the gateway uses."""

    async def read(self) -> object: ...

    def cancel(self) -> bool: ...


class DisconnectGuard:
    """Cancels the gRPC call the moment the HTTP client goes away.

    One task waits on the ASGI receive channel; by the time it runs the body has been read, so the
    next message there is the disconnect. The engine then stops generating within a step instead
    of finishing an answer nobody reads.
    """

    def __init__(self, receive: Receive, call: GenerationCall) -> None:
        self.disconnected = False
        self._task = asyncio.get_running_loop().create_task(self._watch(receive, call))

    async def _watch(self, receive: Receive, call: GenerationCall) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self.disconnected = True
        call.cancel()

    def close(self) -> None:
        self._task.cancel()


class SseResponse(Response):
    """An SSE response that owns its call: cancels it on disconnect, drains it after [DONE].

    Starlette's StreamingResponse would add a task group per request and leave the generator to
    the garbage collector on ASGI servers that report disconnects through send().
    """

    media_type = SSE_MEDIA_TYPE

    def __init__(
        self,
        events: AsyncIterator[bytes],
        guard: DisconnectGuard,
        finish: Callable[[], Awaitable[None]],
    ) -> None:
        self.status_code = 200
        self.background = None
        self.init_headers(_SSE_HEADERS)
        self._events = events
        self._guard = guard
        self._finish = finish

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            async for chunk in self._events:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except asyncio.CancelledError:
            # grpc reports a call we cancelled ourselves as CancelledError; that is the client
            # leaving, not this task being cancelled.
            if not self._guard.disconnected or _task_cancelling():
                raise
            return
        except OSError:
            return  # the client left while we were writing; the generator's finally cancels
        finally:
            self._guard.close()
            await self._events.aclose()  # type: ignore[attr-defined]
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        await self._finish()


def _task_cancelling() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


async def _next(call: GenerationCall) -> GenerationEvent | None:
    message = await call.read()
    return None if message is _EOF else cast(GenerationEvent, message)


async def _drain(call: GenerationCall) -> None:
    """Read to the status after `end`, so the Doorman finishes (and writes its ledger record)
    rather than seeing a cancellation."""
    try:
        while await call.read() is not _EOF:
            pass
    except grpc.RpcError as error:
        log.warning("doorman failed after the end of a stream: %s", error)
    except asyncio.CancelledError:
        if _task_cancelling():
            raise


class OpenAIServing:
    """Serves the OpenAI endpoints by calling the Doorman; one instance per app, built once."""

    def __init__(self, channel: grpc.aio.Channel, metrics: GatewayMetrics) -> None:
        self._doorman = doorman_pb2_grpc.DoormanServiceStub(channel)
        self._health = health_pb2_grpc.HealthStub(channel)
        self._metrics = metrics
        self._list_models = doorman_pb2.DoormanServiceListModelsRequest()
        self._health_check = health_pb2.HealthCheckRequest(service="")

    async def ready(self, timeout_s: float = 2.0) -> bool:
        """Whether the Doorman's overall health is SERVING."""
        try:
            reply = await self._health.Check(self._health_check, timeout=timeout_s)
        except grpc.RpcError:
            return False
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

    async def models(self, ctx: CallContext) -> Response:
        try:
            reply = await self._doorman.ListModels(self._list_models, metadata=ctx.metadata)
        except grpc.RpcError as error:
            return errors.from_grpc(error).response()
        data = [
            # Beyond OpenAI's fields: whether the model is in memory now, and its context.
            {
                "id": m.name,
                "object": "model",
                "created": 0,
                "owned_by": m.owned_by,
                "loaded": m.loaded,
                "context_length": m.context_length,
            }
            for m in reply.models
        ]
        return _json({"object": "list", "data": data})

    async def chat(self, body: ChatCompletionRequest, ctx: CallContext) -> Response:
        call = self._doorman.Chat(chat_request(body), metadata=ctx.metadata)
        fmt = ChatFormat(ctx.request_id, body.model, body.include_usage)
        return await self._generate(cast(GenerationCall, call), fmt, body.streaming, ctx)

    async def complete(self, body: CompletionRequest, ctx: CallContext) -> Response:
        call = self._doorman.Complete(completion_request(body), metadata=ctx.metadata)
        fmt = CompletionFormat(ctx.request_id, body.model, body.include_usage)
        return await self._generate(cast(GenerationCall, call), fmt, body.streaming, ctx)

    async def _generate(
        self,
        call: GenerationCall,
        fmt: ResponseFormat,
        stream: bool,
        ctx: CallContext,
    ) -> Response:
        guard = DisconnectGuard(ctx.receive, call)
        handed_over = False
        try:
            # Wait for the first event before answering, so that refusals (unknown model, limits,
            # no tier) are real HTTP errors with their status, not errors inside a 200 stream.
            first = await _next(call)
            if stream:
                handed_over = True
                return SseResponse(self._stream(call, first, fmt, ctx), guard, lambda: _drain(call))
            return await self._collect(call, first, fmt, ctx)
        except grpc.RpcError as error:
            return errors.from_grpc(error).response()
        except asyncio.CancelledError:
            if not guard.disconnected or _task_cancelling():
                raise
            # Nobody reads this; it only gives logs and metrics the right status.
            return Response(status_code=499)
        finally:
            if not handed_over:
                guard.close()
                call.cancel()

    async def _collect(
        self,
        call: GenerationCall,
        event: GenerationEvent | None,
        fmt: ResponseFormat,
        ctx: CallContext,
    ) -> Response:
        parts: list[str] = []
        logprobs: list[types_pb2.TokenLogprob] = []
        while event is not None:
            kind = event.WhichOneof("event")
            if kind == "delta":
                if not parts:
                    self._metrics.ttft.labels(ctx.route).observe(time.perf_counter() - ctx.started)
                parts.append(event.delta.text)
                logprobs.extend(event.delta.logprobs)
            elif kind == "end":
                end = event.end
                self._count_tokens(ctx.route, end.usage)
                body = fmt.complete("".join(parts), end, logprobs)
                response = _json({**body, "slm": slm_extension(end)})
                await _drain(call)
                return response
            event = await _next(call)
        return _missing_end(ctx).response()

    async def _stream(
        self,
        call: GenerationCall,
        event: GenerationEvent | None,
        fmt: ResponseFormat,
        ctx: CallContext,
    ) -> AsyncIterator[bytes]:
        finished = False
        try:
            opening = fmt.opening()
            if opening is not None:
                yield opening
            first_token = True
            while event is not None:
                kind = event.WhichOneof("event")
                if kind == "delta":
                    text = event.delta.text
                    if text and first_token:
                        first_token = False
                        self._metrics.ttft.labels(ctx.route).observe(
                            time.perf_counter() - ctx.started
                        )
                    if event.delta.logprobs:
                        yield fmt.delta_with_logprobs(text, event.delta.logprobs)
                    elif text:
                        yield fmt.delta(text)
                elif kind == "end":
                    end = event.end
                    self._count_tokens(ctx.route, end.usage)
                    yield fmt.finish(finish_reason(end.finish_reason), end)
                    if fmt.include_usage:
                        yield fmt.usage(end.usage)
                    yield SSE_DONE
                    finished = True
                    return
                event = await _next(call)
            yield _missing_end(ctx).sse()
            yield SSE_DONE
        except grpc.RpcError as error:
            # Headers are gone already: the error travels as the stream's last event.
            yield errors.from_grpc(error).sse()
            yield SSE_DONE
        finally:
            if not finished:
                call.cancel()

    async def chat_events(
        self, body: ChatCompletionRequest, ctx: CallContext
    ) -> AsyncIterator[bytes]:
        """The SSE events of a streamed chat, for a transport other than HTTP (the WebSocket).

        A refusal before the first event raises grpc.RpcError, so the caller can answer it as a
        plain error; closing the iterator early cancels the generation.
        """
        call = self._doorman.Chat(chat_request(body), metadata=ctx.metadata)
        fmt = ChatFormat(ctx.request_id, body.model, body.include_usage)
        try:
            first = await _next(cast(GenerationCall, call))
            async for event in self._stream(cast(GenerationCall, call), first, fmt, ctx):
                yield event
            if not call.done():
                await _drain(cast(GenerationCall, call))
        finally:
            call.cancel()

    def _count_tokens(self, route: str, usage: types_pb2.Usage) -> None:
        self._metrics.prompt_tokens.labels(route).inc(usage.prompt_tokens)
        self._metrics.completion_tokens.labels(route).inc(usage.completion_tokens)


def _missing_end(ctx: CallContext) -> HttpError:
    log.error("doorman stream ended without an end event")
    return errors.internal("the generation stream ended early")


def _json(payload: Mapping[str, Any]) -> Response:
    return Response(
        json.dumps(payload, separators=(",", ":")).encode(), media_type="application/json"
    )
