"""Responses API <-> the Doorman's Chat: the request translation and the Response object."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from gateway.errors import HttpError
from gateway.responses.protocol import InputItem, ResponsesRequest
from gateway.responses.streaming_events import ResponseEvents
from gateway.serving import (
    ChoiceOut,
    Generation,
    Rendering,
    json_object_constraint,
    json_schema_constraint,
    json_text,
    tool_spec,
)
from slm.v1 import doorman_pb2, types_pb2

_ROLES: Mapping[str, types_pb2.Role.ValueType] = {
    "system": types_pb2.ROLE_SYSTEM,
    "developer": types_pb2.ROLE_SYSTEM,
    "user": types_pb2.ROLE_USER,
    "assistant": types_pb2.ROLE_ASSISTANT,
}

RESPONSE_ID_PREFIX = "resp_"


# --- Responses -> protobuf ----------------------------------------------------------------------


def chat_messages(body: ResponsesRequest) -> list[types_pb2.ChatMessage]:
    """instructions, then the input items in order; function calls join their assistant turn."""
    messages: list[types_pb2.ChatMessage] = []
    if body.instructions:
        messages.append(
            types_pb2.ChatMessage(role=types_pb2.ROLE_SYSTEM, content=body.instructions)
        )
    previous: InputItem | None = None
    for item in body.input:
        if item.type == "message":
            assert item.role is not None  # the wire model requires it
            messages.append(types_pb2.ChatMessage(role=_ROLES[item.role], content=item.text))
        elif item.type == "function_call":
            call = types_pb2.ToolCall(
                id=item.call_id or "", name=item.name or "", arguments=item.arguments or ""
            )
            # Calls right after an assistant message (or after each other) are that turn's.
            if previous is not None and (
                previous.type == "function_call"
                or (previous.type == "message" and previous.role == "assistant")
            ):
                messages[-1].tool_calls.append(call)
            else:
                messages.append(
                    types_pb2.ChatMessage(role=types_pb2.ROLE_ASSISTANT, tool_calls=[call])
                )
        elif item.type == "function_call_output":
            messages.append(
                types_pb2.ChatMessage(
                    role=types_pb2.ROLE_TOOL,
                    content=item.output_text,
                    tool_call_id=item.call_id or "",
                )
            )
        else:
            continue  # reasoning of an earlier answer: not shown to the model (see protocol)
        previous = item
    return messages


def _constraint(body: ResponsesRequest) -> types_pb2.OutputConstraint | None:
    fmt = body.text.format if body.text is not None else None
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return json_object_constraint()
    assert fmt.name is not None
    assert fmt.schema_ is not None
    return json_schema_constraint(fmt.name, fmt.schema_, fmt.strict)


def chat_request(body: ResponsesRequest) -> doorman_pb2.ChatRequest:
    sampling = types_pb2.SamplingParams()
    if body.max_output_tokens is not None:
        sampling.max_tokens = body.max_output_tokens
    if body.temperature is not None:
        sampling.temperature = body.temperature
    if body.top_p is not None:
        sampling.top_p = body.top_p
    constraint = _constraint(body)
    if constraint is not None:
        sampling.constraint.CopyFrom(constraint)
    request = doorman_pb2.ChatRequest(
        model=body.model, messages=chat_messages(body), sampling=sampling
    )
    tools = [
        types_pb2.Tool(
            name=t.name,
            description=t.description or "",
            parameters=json_text(t.parameters),
            strict=bool(t.strict),
        )
        for t in body.tools or []
    ]
    choice = body.tool_choice
    spec = tool_spec(
        tools,
        choice.type if choice else None,
        (choice.name or "") if choice else "",
        body.parallel_tool_calls,
    )
    if spec is not None:
        request.tools.CopyFrom(spec)
    return request


# --- protobuf -> Responses ----------------------------------------------------------------------


def status_of(reason: types_pb2.FinishReason.ValueType) -> tuple[str, dict[str, str] | None]:
    """The response's status and incomplete_details for a finish reason."""
    if reason == types_pb2.FINISH_REASON_LENGTH:
        return "incomplete", {"reason": "max_output_tokens"}
    if reason == types_pb2.FINISH_REASON_CONTENT_FILTER:
        return "incomplete", {"reason": "content_filter"}
    return "completed", None


def usage_json(usage: types_pb2.Usage) -> dict[str, Any]:
    return {
        "input_tokens": usage.prompt_tokens,
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": usage.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": usage.total_tokens or usage.prompt_tokens + usage.completion_tokens,
    }


class ResponsesRendering(Rendering):
    """One Responses answer: the Response object, or its stream of events (ResponseEvents)."""

    def __init__(self, request_id: str, body: ResponsesRequest) -> None:
        self.id = RESPONSE_ID_PREFIX + request_id
        self.created_at = int(time.time())
        self._body = body
        self._events = ResponseEvents(self.id, self.response)

    def response(
        self,
        status: str,
        output: list[dict[str, Any]],
        end: types_pb2.StreamEnd | None = None,
    ) -> dict[str, Any]:
        """The Response object, in progress (no end yet) or finished."""
        body = self._body
        fmt = body.text.format if body.text is not None and body.text.format else None
        details = status_of(end.finish_reason)[1] if end is not None else None
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "error": None,
            "incomplete_details": details,
            "instructions": body.instructions,
            "max_output_tokens": body.max_output_tokens,
            "model": (end.model if end is not None and end.model else body.model),
            "output": output,
            "parallel_tool_calls": body.parallel_tool_calls is not False,
            "previous_response_id": None,
            "reasoning": None,
            "store": False,
            "temperature": body.temperature,
            "text": {
                "format": fmt.model_dump(by_alias=True, exclude_none=True)
                if fmt
                else {"type": "text"}
            },
            "tool_choice": body.tool_choice.wire() if body.tool_choice else "auto",
            "tools": [t.model_dump() for t in body.tools or []],
            "top_p": body.top_p,
            "truncation": "disabled",
            "usage": usage_json(end.usage) if end is not None else None,
            "user": body.user,
            "metadata": body.metadata or {},
        }

    def whole(self, generation: Generation) -> dict[str, Any]:
        end = generation.end
        choice: ChoiceOut = generation.choices[0]
        status, _ = status_of(end.finish_reason)
        items = self._events.items
        output: list[dict[str, Any]] = []
        if choice.reasoning:
            output.append(items.reasoning(choice.reasoning, "completed"))
        if choice.text or not choice.tool_calls:
            output.append(items.message(choice.text, status))
        for call in choice.tool_calls:
            output.append(items.function_call(call.id, call.name, call.arguments, "completed"))
        return self.response(status, output, end)

    def opening(self) -> list[bytes]:
        return self._events.opening()

    def delta(self, delta: types_pb2.TextDelta) -> list[bytes]:
        return self._events.delta(delta)

    def closing(self, end: types_pb2.StreamEnd) -> list[bytes]:
        return self._events.closing(end, status_of(end.finish_reason)[0])

    def failure(self, error: HttpError) -> list[bytes]:
        return self._events.failure(error)
