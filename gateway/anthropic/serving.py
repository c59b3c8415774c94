"""Anthropic Messages <-> the Doorman's Chat: the request translation, the answer and its events.

The whole event sequence of a streamed message lives in MessagesRendering: message_start, ping,
then per block content_block_start / content_block_delta (text_delta, input_json_delta,
thinking_delta) / content_block_stop, then message_delta (stop_reason, usage) and message_stop.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

from starlette.responses import Response

from gateway.anthropic.protocol import (
    ContentBlock,
    CountTokensRequest,
    MessageParam,
    MessagesRequest,
    _Conversation,
)
from gateway.errors import HttpError
from gateway.serving import (
    Generation,
    RenderError,
    Rendering,
    json_response,
    json_schema_constraint,
    json_text,
    sse_event,
    tool_spec,
)
from slm.v1 import doorman_pb2, types_pb2

log = logging.getLogger(__name__)

# Anthropic's error types by HTTP status; every other 5xx is an api_error.
_ERROR_TYPES: Mapping[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
}

_TOOL_CHOICE_MODES: Mapping[str, str] = {
    "auto": "auto",
    "any": "required",
    "tool": "function",
    "none": "none",
}

# Anthropic names its tool-use ids toolu_...; the engine's ids get that prefix on the way out.
TOOL_ID_PREFIX = "toolu_"
MESSAGE_ID_PREFIX = "msg_"


def error_body(error: HttpError) -> dict[str, Any]:
    kind = _ERROR_TYPES.get(
        error.status, "api_error" if error.status >= 500 else "invalid_request_error"
    )
    return {"type": "error", "error": {"type": kind, "message": error.message}}


def error_response(error: HttpError) -> Response:
    """An error in Anthropic's shape, with the status (and Retry-After) of the error table."""
    response = json_response(error_body(error), error.status)
    response.headers.update(error.headers())
    return response


# --- Anthropic -> protobuf ----------------------------------------------------------------------


def _tool_result(block: ContentBlock) -> types_pb2.ChatMessage:
    text = block.result_text
    if block.is_error:
        # The contract's tool message has no error flag; the model reads it from the text.
        text = f"Error: {text}"
    return types_pb2.ChatMessage(
        role=types_pb2.ROLE_TOOL, content=text, tool_call_id=block.tool_use_id or ""
    )


def _user_messages(message: MessageParam) -> list[types_pb2.ChatMessage]:
    """A user turn in order: each tool_result a tool message, each run of text a user message."""
    out: list[types_pb2.ChatMessage] = []
    texts: list[str] = []
    for block in message.content:
        if block.type == "tool_result":
            if texts:
                out.append(
                    types_pb2.ChatMessage(role=types_pb2.ROLE_USER, content="\n".join(texts))
                )
                texts = []
            out.append(_tool_result(block))
        else:
            texts.append(block.text or "")
    if texts or not out:
        out.append(types_pb2.ChatMessage(role=types_pb2.ROLE_USER, content="\n".join(texts)))
    return out


def _assistant_message(message: MessageParam) -> types_pb2.ChatMessage:
    # Thinking blocks of earlier turns are not shown to the model, as Anthropic's API does.
    texts = [b.text or "" for b in message.content if b.type == "text"]
    calls = [
        types_pb2.ToolCall(id=b.id or "", name=b.name or "", arguments=json_text(b.input or {}))
        for b in message.content
        if b.type == "tool_use"
    ]
    return types_pb2.ChatMessage(
        role=types_pb2.ROLE_ASSISTANT, content="\n".join(texts), tool_calls=calls
    )


def chat_messages(body: _Conversation) -> list[types_pb2.ChatMessage]:
    messages: list[types_pb2.ChatMessage] = []
    if body.system:
        system = "\n".join(b.text for b in body.system)
        messages.append(types_pb2.ChatMessage(role=types_pb2.ROLE_SYSTEM, content=system))
    for message in body.messages:
        if message.role == "user":
            messages.extend(_user_messages(message))
        else:
            messages.append(_assistant_message(message))
    return messages


def chat_tools(body: _Conversation) -> types_pb2.ToolSpec | None:
    tools = [
        types_pb2.Tool(
            name=t.name,
            description=t.description or "",
            parameters=json_text(t.input_schema),
            strict=bool(t.strict),
        )
        for t in body.tools or []
    ]
    choice = body.tool_choice
    parallel = None
    if choice is not None and choice.disable_parallel_tool_use is not None:
        parallel = not choice.disable_parallel_tool_use
    return tool_spec(
        tools,
        _TOOL_CHOICE_MODES[choice.type] if choice else None,
        (choice.name or "") if choice else "",
        parallel,
    )


def chat_request(body: MessagesRequest) -> doorman_pb2.ChatRequest:
    sampling = types_pb2.SamplingParams(
        max_tokens=body.max_tokens, stop=[s for s in body.stop_sequences or [] if s]
    )
    if body.temperature is not None:
        sampling.temperature = body.temperature
    if body.top_p is not None:
        sampling.top_p = body.top_p
    if body.top_k is not None:
        sampling.top_k = body.top_k
    if body.output_config is not None and body.output_config.format is not None:
        schema = body.output_config.format.schema_
        sampling.constraint.CopyFrom(json_schema_constraint("output", schema, True))
    request = doorman_pb2.ChatRequest(
        model=body.model, messages=chat_messages(body), sampling=sampling
    )
    tools = chat_tools(body)
    if tools is not None:
        request.tools.CopyFrom(tools)
    return request


def count_tokens_request(body: CountTokensRequest) -> doorman_pb2.DoormanServiceCountTokensRequest:
    request = doorman_pb2.DoormanServiceCountTokensRequest(
        model=body.model, messages=chat_messages(body)
    )
    tools = chat_tools(body)
    if tools is not None:
        request.tools.CopyFrom(tools)
    return request


# --- protobuf -> Anthropic ----------------------------------------------------------------------


def stop_reason(end: types_pb2.StreamEnd) -> tuple[str, str | None]:
    """Anthropic's stop_reason and stop_sequence for how a stream ended."""
    reason = end.finish_reason
    if reason == types_pb2.FINISH_REASON_LENGTH:
        return "max_tokens", None
    if reason == types_pb2.FINISH_REASON_TOOL_CALLS:
        return "tool_use", None
    if reason == types_pb2.FINISH_REASON_CONTENT_FILTER:
        return "refusal", None
    if end.stop_sequence:
        return "stop_sequence", end.stop_sequence
    return "end_turn", None


def tool_use_id(call_id: str) -> str:
    return call_id if call_id.startswith(TOOL_ID_PREFIX) else TOOL_ID_PREFIX + call_id


def tool_input(arguments: str) -> dict[str, Any]:
    """A tool call's arguments as Anthropic's input object; other JSON is a server fault."""
    if not arguments.strip():
        return {}
    try:
        value = json.loads(arguments)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        log.error("a tool call's arguments are not a JSON object")
        raise RenderError(
            HttpError(500, "the model's tool call arguments are not a JSON object", "api_error")
        )
    return value


class MessagesRendering(Rendering):
    """One Messages answer: the whole message, or its stream of named events."""

    def __init__(self, request_id: str, model: str) -> None:
        self.id = MESSAGE_ID_PREFIX + request_id
        self.model = model
        self._block = -1  # index of the open content block, -1 when none
        self._block_type = ""
        self._blocks = 0
        self._calls: dict[int, int] = {}  # the contract's call index -> block index

    def whole(self, generation: Generation) -> dict[str, Any]:
        end = generation.end
        choice = generation.choices[0]
        content: list[dict[str, Any]] = []
        if choice.reasoning:
            content.append({"type": "thinking", "thinking": choice.reasoning, "signature": ""})
        if choice.text:
            content.append({"type": "text", "text": choice.text})
        for call in choice.tool_calls:
            content.append(
                {
                    "type": "tool_use",
                    "id": tool_use_id(call.id),
                    "name": call.name,
                    "input": tool_input(call.arguments),
                }
            )
        reason, sequence = stop_reason(end)
        return {
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "content": content,
            "model": end.model or self.model,
            "stop_reason": reason,
            "stop_sequence": sequence,
            "usage": {
                "input_tokens": end.usage.prompt_tokens,
                "output_tokens": end.usage.completion_tokens,
            },
        }

    def opening(self) -> list[bytes]:
        message: dict[str, Any] = {
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "content": [],
            "model": self.model,
            "stop_reason": None,
            "stop_sequence": None,
            # The prompt's size is known only at the end; message_delta carries both counts.
            "usage": {"input_tokens": 0, "output_tokens": 0},
        }
        return [
            sse_event("message_start", {"type": "message_start", "message": message}),
            sse_event("ping", {"type": "ping"}),
        ]

    def _close_block(self) -> list[bytes]:
        if self._block < 0:
            return []
        index, self._block, self._block_type = self._block, -1, ""
        return [sse_event("content_block_stop", {"type": "content_block_stop", "index": index})]

    def _open_block(self, block: dict[str, Any]) -> list[bytes]:
        frames = self._close_block()
        self._block = self._blocks
        self._block_type = block["type"]
        self._blocks += 1
        frames.append(
            sse_event(
                "content_block_start",
                {"type": "content_block_start", "index": self._block, "content_block": block},
            )
        )
        return frames

    def _block_delta(self, index: int, delta: dict[str, Any]) -> bytes:
        return sse_event(
            "content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta}
        )

    def delta(self, delta: types_pb2.TextDelta) -> list[bytes]:
        frames: list[bytes] = []
        if delta.reasoning:
            if self._block_type != "thinking":
                frames += self._open_block({"type": "thinking", "thinking": "", "signature": ""})
            frames.append(
                self._block_delta(
                    self._block, {"type": "thinking_delta", "thinking": delta.reasoning}
                )
            )
        if delta.text:
            if self._block_type != "text":
                frames += self._open_block({"type": "text", "text": ""})
            frames.append(
                self._block_delta(self._block, {"type": "text_delta", "text": delta.text})
            )
        for piece in delta.tool_calls:
            if piece.id and piece.index not in self._calls:
                frames += self._open_block(
                    {
                        "type": "tool_use",
                        "id": tool_use_id(piece.id),
                        "name": piece.name,
                        "input": {},
                    }
                )
                self._calls[piece.index] = self._block
            index = self._calls.get(piece.index, self._block)
            if piece.arguments:
                frames.append(
                    self._block_delta(
                        index, {"type": "input_json_delta", "partial_json": piece.arguments}
                    )
                )
        return frames

    def closing(self, end: types_pb2.StreamEnd) -> list[bytes]:
        frames = self._close_block()
        reason, sequence = stop_reason(end)
        frames.append(
            sse_event(
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": reason, "stop_sequence": sequence},
                    "usage": {
                        "input_tokens": end.usage.prompt_tokens,
                        "output_tokens": end.usage.completion_tokens,
                    },
                },
            )
        )
        frames.append(sse_event("message_stop", {"type": "message_stop"}))
        return frames

    def failure(self, error: HttpError) -> list[bytes]:
        return [sse_event("error", error_body(error))]

    def error_response(self, error: HttpError) -> Response:
        return error_response(error)
