"""Reading slm.v1 messages shared by every InferenceService implementation."""

from __future__ import annotations

from collections.abc import Iterable
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
class ChatTurn:
    role: str
    content: str
    name: str = ""


def chat_turns(messages: Iterable[types_pb2.ChatMessage]) -> list[ChatTurn]:
    """The messages of a chat with their roles named; an unset role is the client's error."""
    turns = []
    for i, m in enumerate(messages):
        role = ROLE_NAMES.get(m.role)
        if role is None:
            raise InvalidArgument(f"messages[{i}].role is not set", field=f"messages[{i}].role")
        turns.append(ChatTurn(role, m.content, m.name))
    return turns
