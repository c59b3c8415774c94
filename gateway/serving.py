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
from gateway.protocol import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    _GenerationRequest,
)
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
    types_pb2.FINISH_REASON_TOOL_CALLS: "tool_calls",
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


def call_metadata(
    request_id: str, authorization: str | None, cache_control: str | None = None
) -> tuple[tuple[str, str], ...]:
    """gRPC metadata for a Doorman call: the request id, the caller's key when it sent one, and
    its Cache-Control header, which the Doorman's result cache honours (no-cache bypasses it)."""
    metadata: tuple[tuple[str, str], ...] = (("x-request-id", request_id),)
    if authorization:
        metadata += (("authorization", authorization),)
    if cache_control:
        metadata += (("cache-control", cache_control),)
    return metadata


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
    if body.n is not None and body.n != 1:
        params.n = body.n
    constraint = output_constraint(body)
    if constraint is not None:
        params.constraint.CopyFrom(constraint)
    return params


def json_text(value: Mapping[str, Any] | None) -> str:
    """A JSON object as compact text, keys in the caller's order; None is "" (no schema)."""
    return "" if value is None else json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def json_schema_constraint(
    name: str, schema: Mapping[str, Any], strict: bool | None
) -> types_pb2.OutputConstraint:
    return types_pb2.OutputConstraint(
        json_schema=types_pb2.JsonSchemaConstraint(
            name=name, schema=json_text(schema), strict=bool(strict)
        )
    )


def json_object_constraint() -> types_pb2.OutputConstraint:
    return types_pb2.OutputConstraint(json_object=types_pb2.JsonObjectConstraint())


def output_constraint(body: _GenerationRequest) -> types_pb2.OutputConstraint | None:
    """The one output constraint a request asked for (the wire model allows at most one)."""
    fmt = body.response_format
    if fmt is not None and fmt.json_schema is not None:
        spec = fmt.json_schema
        return json_schema_constraint(spec.name, spec.schema_, spec.strict)
    if fmt is not None and fmt.type == "json_object":
        return json_object_constraint()
    if body.guided_json is not None:
        assert isinstance(body.guided_json, dict)  # the wire model parsed text to an object
        return json_schema_constraint("guided_json", body.guided_json, True)
    if body.guided_regex is not None:
        return types_pb2.OutputConstraint(regex=body.guided_regex)
    if body.guided_choice is not None:
        return types_pb2.OutputConstraint(
            choice=types_pb2.ChoiceConstraint(choices=body.guided_choice)
        )
    if body.guided_grammar is not None:
        return types_pb2.OutputConstraint(
            grammar=types_pb2.Grammar(
                syntax=types_pb2.GRAMMAR_SYNTAX_GBNF, source=body.guided_grammar
            )
        )
    return None


TOOL_CHOICE_MODES: Mapping[str, types_pb2.ToolChoiceMode.ValueType] = {
    "none": types_pb2.TOOL_CHOICE_MODE_NONE,
    "auto": types_pb2.TOOL_CHOICE_MODE_AUTO,
    "required": types_pb2.TOOL_CHOICE_MODE_REQUIRED,
    "function": types_pb2.TOOL_CHOICE_MODE_FUNCTION,
}


def tool_spec(
    tools: Sequence[types_pb2.Tool],
    mode: str | None,
    function_name: str = "",
    parallel: bool | None = None,
) -> types_pb2.ToolSpec | None:
    """The ToolSpec of a request, or None when it offers no tools.

    `mode` is one of TOOL_CHOICE_MODES' keys; unset means "auto", OpenAI's default with tools.
    """
    if not tools:
        return None
    spec = types_pb2.ToolSpec(
        tools=tools,
        choice=types_pb2.ToolChoice(
            mode=TOOL_CHOICE_MODES[mode or "auto"], function_name=function_name
        ),
    )
    if parallel is not None:
        spec.parallel_tool_calls = parallel
    return spec


def _chat_tools(body: ChatCompletionRequest) -> types_pb2.ToolSpec | None:
    tools = [
        types_pb2.Tool(
            name=t.function.name,
            description=t.function.description or "",
            parameters=json_text(t.function.parameters),
            strict=bool(t.function.strict),
        )
        for t in body.tools or []
    ]
    choice = body.tool_choice
    return tool_spec(
        tools,
        choice.type if choice else None,
        choice.function.name if choice and choice.function else "",
        body.parallel_tool_calls,
    )


def _chat_message(message: ChatMessage) -> types_pb2.ChatMessage:
    return types_pb2.ChatMessage(
        role=ROLES[message.role],
        content=message.content,
        name=message.name or "",
        tool_calls=[
            types_pb2.ToolCall(id=c.id, name=c.function.name, arguments=c.function.arguments)
            for c in message.tool_calls or []
        ],
        tool_call_id=message.tool_call_id or "",
    )


def chat_request(body: ChatCompletionRequest) -> doorman_pb2.ChatRequest:
    request = doorman_pb2.ChatRequest(
        model=body.model,
        messages=[_chat_message(m) for m in body.messages],
        sampling=sampling_params(body),
    )
    tools = _chat_tools(body)
    if tools is not None:
        request.tools.CopyFrom(tools)
    return request


def completion_request(body: CompletionRequest) -> doorman_pb2.CompleteRequest:
    return doorman_pb2.CompleteRequest(
        model=body.model, prompt=body.prompt, sampling=sampling_params(body)
    )


# --- protobuf -> OpenAI -------------------------------------------------------------------------


def finish_reason(reason: types_pb2.FinishReason.ValueType) -> str:
    # CANCELLED never reaches a client that is still listening; UNSPECIFIED is a Doorman bug.
    # Both read as a plain stop rather than an invented reason OpenAI clients do not know.
    return FINISH_REASONS.get(reason, "stop")


def choice_ends(end: types_pb2.StreamEnd) -> list[tuple[int, types_pb2.FinishReason.ValueType]]:
    """(index, finish reason) of every choice, in index order; one choice when n was 1."""
    if end.choices:
        return sorted((c.index, c.finish_reason) for c in end.choices)
    return [(0, end.finish_reason)]


def stop_reason(end: types_pb2.StreamEnd, index: int) -> str | None:
    """vLLM's `stop_reason`: the stop string that ended a choice, None when none did."""
    if end.choices:
        stop = next((c.stop_sequence for c in end.choices if c.index == index), "")
    else:
        stop = end.stop_sequence if index == 0 else ""
    return stop or None


def usage_dict(usage: types_pb2.Usage) -> dict[str, int]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens or usage.prompt_tokens + usage.completion_tokens,
    }


def slm_extension(end: types_pb2.StreamEnd) -> dict[str, Any]:
    """service-slm's own figures, as a top-level "slm" object on the final chunk or response.

    Which tier and upstream served the answer (none: `cached`, a replay from the Doorman's
    result cache), and how much personal data of each type the Doorman masked before the
    request left and restored in the answer. OpenAI clients ignore unknown top-level fields,
    so this is safe to send to all of them.
    """
    return {
        "tier": TIERS.get(end.tier),
        "upstream": end.upstream or None,
        "cached": end.cache_hit,
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


def sse_event(name: str, payload: Mapping[str, Any]) -> bytes:
    """An SSE frame with an event name, as the Responses and Messages APIs send them."""
    data = json.dumps(payload, separators=(",", ":"))
    return f"event: {name}\ndata: {data}\n\n".encode()


LogprobList = Sequence[types_pb2.TokenLogprob]


@dataclass(frozen=True, slots=True)
class ToolCallOut:
    """A whole tool call, assembled from its streamed pieces."""

    id: str
    name: str
    arguments: str


@dataclass(frozen=True, slots=True)
class ChoiceOut:
    """Everything one choice produced."""

    index: int
    text: str
    reasoning: str
    tool_calls: tuple[ToolCallOut, ...]
    logprobs: tuple[types_pb2.TokenLogprob, ...]
    finish_reason: types_pb2.FinishReason.ValueType


@dataclass(frozen=True, slots=True)
class Generation:
    """A whole generation, as a non-streamed answer shows it: its choices and its end."""

    choices: tuple[ChoiceOut, ...]
    end: types_pb2.StreamEnd


class _ChoiceParts:
    """The pieces of one choice while its events arrive."""

    __slots__ = ("calls", "logprobs", "reasoning", "text")

    def __init__(self) -> None:
        self.text: list[str] = []
        self.reasoning: list[str] = []
        # index -> [id, name, argument fragments...]
        self.calls: dict[int, list[str]] = {}
        self.logprobs: list[types_pb2.TokenLogprob] = []

    def add(self, delta: types_pb2.TextDelta) -> None:
        if delta.text:
            self.text.append(delta.text)
        if delta.reasoning:
            self.reasoning.append(delta.reasoning)
        self.logprobs.extend(delta.logprobs)
        for piece in delta.tool_calls:
            parts = self.calls.setdefault(piece.index, ["", ""])
            if piece.id:
                parts[0] = piece.id
            if piece.name:
                parts[1] = piece.name
            parts.append(piece.arguments)


class GenerationBuilder:
    """Assembles the events of a Doorman stream into a Generation."""

    def __init__(self) -> None:
        self._choices: dict[int, _ChoiceParts] = {}

    def add(self, delta: types_pb2.TextDelta) -> None:
        parts = self._choices.get(delta.choice_index)
        if parts is None:
            parts = self._choices[delta.choice_index] = _ChoiceParts()
        parts.add(delta)

    def build(self, end: types_pb2.StreamEnd) -> Generation:
        choices = []
        for index, reason in choice_ends(end):
            parts = self._choices.get(index) or _ChoiceParts()
            calls = tuple(
                ToolCallOut(id=p[0], name=p[1], arguments="".join(p[2:]))
                for _, p in sorted(parts.calls.items())
            )
            choices.append(
                ChoiceOut(
                    index=index,
                    text="".join(parts.text),
                    reasoning="".join(parts.reasoning),
                    tool_calls=calls,
                    logprobs=tuple(parts.logprobs),
                    finish_reason=reason,
                )
            )
        return Generation(choices=tuple(choices), end=end)


class RenderError(Exception):
    """A generation that cannot be spelled in the family's format; answered as its error."""

    def __init__(self, error: HttpError) -> None:
        super().__init__(error.message)
        self.error = error


class Rendering(abc.ABC):
    """How one API family spells a generation: whole, as a stream of events, and its errors.

    Every family (chat and completions, Responses, Messages) has one; OpenAIServing.generate
    runs the Doorman call and hands each event here.
    """

    @abc.abstractmethod
    def whole(self, generation: Generation) -> dict[str, Any]:
        """The non-streamed response body; raises RenderError when it cannot be spelled."""

    @abc.abstractmethod
    def opening(self) -> list[bytes]:
        """Events to send before the first delta."""

    @abc.abstractmethod
    def delta(self, delta: types_pb2.TextDelta) -> list[bytes]:
        """Events for one delta of the Doorman's stream."""

    @abc.abstractmethod
    def closing(self, end: types_pb2.StreamEnd) -> list[bytes]:
        """The last events of a stream that ended well."""

    @abc.abstractmethod
    def failure(self, error: HttpError) -> list[bytes]:
        """The last events of a stream that failed after it started."""

    def error_response(self, error: HttpError) -> Response:
        """A refusal before the stream started, as a plain HTTP error."""
        return error.response()


class ResponseFormat(Rendering):
    """How the chat and completions endpoints spell their responses and stream chunks.

    The content chunk is sent once per token, so its JSON is a prebuilt prefix and suffix around
    the one string that changes (one prefix per choice index).
    """

    object_name: str
    chunk_object: str
    id_prefix: str
    # The JSON around the text of a content chunk's only choice; `%d` is its index.
    _delta_open: str
    _delta_close: str

    def __init__(self, request_id: str, model: str, include_usage: bool, n: int = 1) -> None:
        self.id = self.id_prefix + request_id
        self.model = model
        self.created = int(time.time())
        self.include_usage = include_usage
        self.n = n
        head = {"id": self.id, "object": self.chunk_object, "created": self.created, "model": model}
        self._head = head
        head_json = json.dumps(head, separators=(",", ":"))[:-1]
        usage_tail = ',"usage":null' if include_usage else ""
        self._delta_prefixes = [
            ("data: " + head_json + self._delta_open % index).encode() for index in range(n)
        ]
        tail = self._delta_close + ',"logprobs":null,"finish_reason":null}]' + usage_tail + "}\n\n"
        self._delta_suffix = tail.encode()

    @abc.abstractmethod
    def _choice(self, text: str | None, reason: str | None, index: int = 0) -> dict[str, Any]:
        """One choice of a chunk."""

    @abc.abstractmethod
    def _rich_delta(self, delta: types_pb2.TextDelta) -> dict[str, Any]:
        """The choice of a chunk that carries more than text: logprobs, tool calls, reasoning."""

    def text_delta(self, text: str, index: int = 0) -> bytes:
        prefix = self._delta_prefixes[index] if index < self.n else None
        if prefix is None:
            return sse(self._chunk([self._choice(text, None, index)]))
        return prefix + json.dumps(text).encode() + self._delta_suffix

    def delta(self, delta: types_pb2.TextDelta) -> list[bytes]:
        if delta.logprobs or delta.tool_calls or delta.reasoning:
            return [sse(self._chunk([self._rich_delta(delta)]))]
        if not delta.text:
            return []
        return [self.text_delta(delta.text, delta.choice_index)]

    def _chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        chunk = {**self._head, "choices": choices}
        if self.include_usage:
            chunk["usage"] = None
        return chunk

    def finish(
        self,
        reason: str,
        end: types_pb2.StreamEnd | None = None,
        index: int = 0,
        stop: str | None = None,
    ) -> bytes:
        chunk = self._chunk([{**self._choice(None, reason, index), "stop_reason": stop}])
        if end is not None:
            chunk["slm"] = slm_extension(end)
        return sse(chunk)

    def usage(self, usage: types_pb2.Usage) -> bytes:
        return sse({**self._head, "choices": [], "usage": usage_dict(usage)})

    def closing(self, end: types_pb2.StreamEnd) -> list[bytes]:
        ends = choice_ends(end)
        # Exactly one finish chunk per choice; the last carries service-slm's figures.
        frames = [
            self.finish(
                finish_reason(reason),
                end if i == len(ends) - 1 else None,
                index,
                stop_reason(end, index),
            )
            for i, (index, reason) in enumerate(ends)
        ]
        if self.include_usage:
            frames.append(self.usage(end.usage))
        frames.append(SSE_DONE)
        return frames

    def failure(self, error: HttpError) -> list[bytes]:
        # Headers are gone already: the error travels as the stream's last event.
        return [error.sse(), SSE_DONE]

    def opening(self) -> list[bytes]:
        return []

    @abc.abstractmethod
    def logprobs_json(self, logprobs: LogprobList) -> dict[str, Any]:
        """OpenAI's logprobs object of one choice, for these tokens."""

    def whole(self, generation: Generation) -> dict[str, Any]:
        end = generation.end
        return {
            "id": self.id,
            "object": self.object_name,
            "created": self.created,
            "model": end.model or self.model,
            # vLLM's stop_reason beside OpenAI's fields: which stop string ended the choice.
            "choices": [
                {**self._whole_choice(c), "stop_reason": stop_reason(end, c.index)}
                for c in generation.choices
            ],
            "usage": usage_dict(end.usage),
            "slm": slm_extension(end),
        }

    @abc.abstractmethod
    def _whole_choice(self, choice: ChoiceOut) -> dict[str, Any]:
        """One choice of the non-streamed response."""


def _token_entry(lp: types_pb2.TokenLogprob | types_pb2.TopLogprob) -> dict[str, Any]:
    return {"token": lp.token, "logprob": lp.logprob, "bytes": list(lp.bytes)}


def tool_call_delta_json(piece: types_pb2.ToolCallDelta) -> dict[str, Any]:
    """One entry of a chunk's delta.tool_calls: id, type and name only in a call's first piece."""
    if piece.id:
        return {
            "index": piece.index,
            "id": piece.id,
            "type": "function",
            "function": {"name": piece.name, "arguments": piece.arguments},
        }
    return {"index": piece.index, "function": {"arguments": piece.arguments}}


class ChatFormat(ResponseFormat):
    object_name = "chat.completion"
    chunk_object = "chat.completion.chunk"
    id_prefix = "chatcmpl-"

    _delta_open = ',"choices":[{"index":%d,"delta":{"content":'
    _delta_close = "}"

    def _choice(self, text: str | None, reason: str | None, index: int = 0) -> dict[str, Any]:
        delta = {} if text is None else {"content": text}
        return {"index": index, "delta": delta, "logprobs": None, "finish_reason": reason}

    def _rich_delta(self, delta: types_pb2.TextDelta) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if delta.reasoning:
            out["reasoning_content"] = delta.reasoning
        if delta.text or delta.logprobs:
            out["content"] = delta.text
        if delta.tool_calls:
            out["tool_calls"] = [tool_call_delta_json(p) for p in delta.tool_calls]
        return {
            "index": delta.choice_index,
            "delta": out,
            "logprobs": self.logprobs_json(delta.logprobs) if delta.logprobs else None,
            "finish_reason": None,
        }

    def opening(self) -> list[bytes]:
        return [
            sse(
                self._chunk(
                    [
                        {
                            "index": index,
                            "delta": {"role": "assistant", "content": ""},
                            "logprobs": None,
                            "finish_reason": None,
                        }
                    ]
                )
            )
            for index in range(self.n)
        ]

    def logprobs_json(self, logprobs: LogprobList) -> dict[str, Any]:
        return {
            "content": [
                {**_token_entry(lp), "top_logprobs": [_token_entry(t) for t in lp.top_logprobs]}
                for lp in logprobs
            ]
        }

    def _whole_choice(self, choice: ChoiceOut) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": choice.text}
        if choice.tool_calls:
            # OpenAI's shape: content is null when the turn is only tool calls.
            message["content"] = choice.text or None
            message["tool_calls"] = [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {"name": call.name, "arguments": call.arguments},
                }
                for call in choice.tool_calls
            ]
        if choice.reasoning:
            message["reasoning_content"] = choice.reasoning
        return {
            "index": choice.index,
            "message": message,
            "logprobs": self.logprobs_json(choice.logprobs) if choice.logprobs else None,
            "finish_reason": finish_reason(choice.finish_reason),
        }


class CompletionFormat(ResponseFormat):
    object_name = "text_completion"
    # OpenAI uses the same object name for completion chunks.
    chunk_object = "text_completion"
    id_prefix = "cmpl-"

    _delta_open = ',"choices":[{"index":%d,"text":'
    _delta_close = ""

    def __init__(self, request_id: str, model: str, include_usage: bool, n: int = 1) -> None:
        super().__init__(request_id, model, include_usage, n)
        # Offsets into each choice's text, for the legacy logprobs shape.
        self._offsets = [0] * n

    def _choice(self, text: str | None, reason: str | None, index: int = 0) -> dict[str, Any]:
        return {"index": index, "text": text or "", "logprobs": None, "finish_reason": reason}

    def _rich_delta(self, delta: types_pb2.TextDelta) -> dict[str, Any]:
        choice = self._choice(delta.text, None, delta.choice_index)
        if delta.logprobs:
            choice["logprobs"] = self.logprobs_json(delta.logprobs, delta.choice_index)
        if delta.reasoning:
            choice["reasoning_content"] = delta.reasoning
        return choice

    def logprobs_json(self, logprobs: LogprobList, index: int = 0) -> dict[str, Any]:
        # The legacy completions shape: parallel lists, offsets into the generated text.
        offsets = []
        offset = self._offsets[index] if index < len(self._offsets) else 0
        for lp in logprobs:
            offsets.append(offset)
            offset += len(lp.token)
        if index < len(self._offsets):
            self._offsets[index] = offset
        return {
            "tokens": [lp.token for lp in logprobs],
            "token_logprobs": [lp.logprob for lp in logprobs],
            "top_logprobs": [{t.token: t.logprob for t in lp.top_logprobs} for lp in logprobs],
            "text_offset": offsets,
        }

    def _whole_choice(self, choice: ChoiceOut) -> dict[str, Any]:
        out: dict[str, Any] = {
            "index": choice.index,
            "text": choice.text,
            "logprobs": self.logprobs_json(choice.logprobs, choice.index)
            if choice.logprobs
            else None,
            "finish_reason": finish_reason(choice.finish_reason),
        }
        if choice.reasoning:
            out["reasoning_content"] = choice.reasoning
        return out


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
    """Calls the Doorman for every generating endpoint; one instance per app, built once.

    The OpenAI endpoints use it directly; the Responses and Messages families hand it their
    protobuf request and their Rendering (`generate`), so every family shares one stub, one
    disconnect guard, one SSE response and one error mapping.
    """

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
        return json_response({"object": "list", "data": data})

    async def count_tokens(
        self, request: doorman_pb2.DoormanServiceCountTokensRequest, ctx: CallContext
    ) -> int:
        """The prompt tokens a chat request would take; raises grpc.RpcError."""
        reply = await self._doorman.CountTokens(request, metadata=ctx.metadata)
        return int(reply.prompt_tokens)

    async def chat(self, body: ChatCompletionRequest, ctx: CallContext) -> Response:
        fmt = ChatFormat(ctx.request_id, body.model, body.include_usage, body.choices)
        return await self.generate(chat_request(body), fmt, body.streaming, ctx)

    async def complete(self, body: CompletionRequest, ctx: CallContext) -> Response:
        call = self._doorman.Complete(completion_request(body), metadata=ctx.metadata)
        fmt = CompletionFormat(ctx.request_id, body.model, body.include_usage, body.choices)
        return await self._generate(cast(GenerationCall, call), fmt, body.streaming, ctx)

    async def generate(
        self,
        request: doorman_pb2.ChatRequest,
        rendering: Rendering,
        stream: bool,
        ctx: CallContext,
    ) -> Response:
        """Run one DoormanService.Chat call and answer it as `rendering` spells it."""
        call = self._doorman.Chat(request, metadata=ctx.metadata)
        return await self._generate(cast(GenerationCall, call), rendering, stream, ctx)

    async def _generate(
        self,
        call: GenerationCall,
        rendering: Rendering,
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
                events = self._stream(call, first, rendering, ctx)
                return SseResponse(events, guard, lambda: _drain(call))
            return await self._collect(call, first, rendering, ctx)
        except grpc.RpcError as error:
            return rendering.error_response(errors.from_grpc(error))
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
        rendering: Rendering,
        ctx: CallContext,
    ) -> Response:
        builder = GenerationBuilder()
        first_token = True
        while event is not None:
            kind = event.WhichOneof("event")
            if kind == "delta":
                if first_token:
                    first_token = False
                    self._metrics.ttft.labels(ctx.route).observe(time.perf_counter() - ctx.started)
                builder.add(event.delta)
            elif kind == "end":
                end = event.end
                self._count_tokens(ctx.route, end.usage)
                try:
                    response = json_response(rendering.whole(builder.build(end)))
                except RenderError as error:
                    response = rendering.error_response(error.error)
                await _drain(call)
                return response
            event = await _next(call)
        return rendering.error_response(_missing_end(ctx))

    async def _stream(
        self,
        call: GenerationCall,
        event: GenerationEvent | None,
        rendering: Rendering,
        ctx: CallContext,
    ) -> AsyncIterator[bytes]:
        finished = False
        try:
            for frame in rendering.opening():
                yield frame
            first_token = True
            while event is not None:
                kind = event.WhichOneof("event")
                if kind == "delta":
                    delta = event.delta
                    if first_token and (delta.text or delta.tool_calls or delta.reasoning):
                        first_token = False
                        self._metrics.ttft.labels(ctx.route).observe(
                            time.perf_counter() - ctx.started
                        )
                    for frame in rendering.delta(delta):
                        yield frame
                elif kind == "end":
                    end = event.end
                    self._count_tokens(ctx.route, end.usage)
                    for frame in rendering.closing(end):
                        yield frame
                    finished = True
                    return
                event = await _next(call)
            for frame in rendering.failure(_missing_end(ctx)):
                yield frame
        except grpc.RpcError as error:
            for frame in rendering.failure(errors.from_grpc(error)):
                yield frame
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
        fmt = ChatFormat(ctx.request_id, body.model, body.include_usage, body.choices)
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


def json_response(payload: Mapping[str, Any], status: int = 200) -> Response:
    return Response(
        json.dumps(payload, separators=(",", ":")).encode(),
        status_code=status,
        media_type="application/json",
    )
