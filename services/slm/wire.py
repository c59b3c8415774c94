"""Reading and writing slm.v1 messages shared by every InferenceService implementation."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from slm.errors import InvalidArgument
from slm.v1 import types_pb2

ROLE_NAMES = {
    types_pb2.ROLE_SYSTEM: "system",
    types_pb2.ROLE_USER: "user",
    types_pb2.ROLE_ASSISTANT: "assistant",
    types_pb2.ROLE_TOOL: "tool",
}


@dataclass(frozen=True)
class TurnToolCall:
    id: str
    name: str
    # The arguments object as JSON text.
    arguments: str


@dataclass(frozen=True)
class ChatTurn:
    role: str
    content: str
    name: str = ""
    # role "assistant": the tools this turn called.
    tool_calls: tuple[TurnToolCall, ...] = ()
    # role "tool": the call whose result `content` is.
    tool_call_id: str = ""


def chat_turns(messages: Iterable[types_pb2.ChatMessage]) -> list[ChatTurn]:
    """The messages of a chat with their roles named; an unset role, tool calls on another
    role than the assistant's, or a tool result without its call id is the client's error."""
    turns = []
    for i, m in enumerate(messages):
        role = ROLE_NAMES.get(m.role)
        if role is None:
            raise InvalidArgument(f"messages[{i}].role is not set", field=f"messages[{i}].role")
        if m.tool_calls and role != "assistant":
            raise InvalidArgument(
                "only assistant messages carry tool calls", field=f"messages[{i}].tool_calls"
            )
        for j, call in enumerate(m.tool_calls):
            if not call.id or not call.name:
                raise InvalidArgument(
                    "a tool call needs an id and a name", field=f"messages[{i}].tool_calls[{j}]"
                )
        if (role == "tool") != bool(m.tool_call_id):
            raise InvalidArgument(
                "tool messages, and only they, carry the id of the call they answer",
                field=f"messages[{i}].tool_call_id",
            )
        calls = tuple(TurnToolCall(c.id, c.name, c.arguments) for c in m.tool_calls)
        turns.append(ChatTurn(role, m.content, m.name, calls, m.tool_call_id))
    return turns


@dataclass(frozen=True)
class EndedChoice:
    """How one choice of a generation ended, in the contract's terms."""

    index: int
    finish_reason: types_pb2.FinishReason.ValueType
    completion_tokens: int
    stop_sequence: str = ""


def stream_end(
    choices: Sequence[EndedChoice],
    *,
    prompt_tokens: int,
    completion_tokens: int,
    model: str,
    tier: types_pb2.Tier.ValueType,
    upstream: str = "",
) -> types_pb2.StreamEnd:
    """The last message of a generation: choice 0's finish and stop string, the usage of all
    choices, and every choice's end when there was more than one."""
    first = choices[0]
    completion = completion_tokens
    end = types_pb2.StreamEnd(
        finish_reason=first.finish_reason,
        usage=types_pb2.Usage(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion,
            total_tokens=prompt_tokens + completion,
        ),
        model=model,
        tier=tier,
        upstream=upstream,
        stop_sequence=first.stop_sequence,
    )
    if len(choices) > 1:
        end.choices.extend(
            types_pb2.ChoiceEnd(
                index=c.index,
                finish_reason=c.finish_reason,
                completion_tokens=c.completion_tokens,
                stop_sequence=c.stop_sequence,
            )
            for c in choices
        )
    return end
