"""The Responses API's output items and its streamed event sequence, in one place.

A stream runs: response.created, response.in_progress; per output item
response.output_item.added, then for a message response.content_part.added,
response.output_text.delta..., response.output_text.done, response.content_part.done (for
reasoning the same with reasoning_text), for a function call
response.function_call_arguments.delta..., response.function_call_arguments.done; then
response.output_item.done; and last response.completed (or response.incomplete when the answer
was cut short). Every event carries a sequence_number from 0. An error after the start is an
`error` event.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from gateway.errors import HttpError
from gateway.serving import sse_event
from slm.v1 import types_pb2

ResponseFactory = Callable[..., dict[str, Any]]


class OutputItems:
    """Output items with ids unique within their response."""

    def __init__(self, response_id: str) -> None:
        self._suffix = response_id.removeprefix("resp_")
        self._count = 0

    def new_id(self, prefix: str) -> str:
        self._count += 1
        return f"{prefix}_{self._suffix}_{self._count}"

    def message(self, text: str, status: str, item_id: str = "") -> dict[str, Any]:
        return {
            "id": item_id or self.new_id("msg"),
            "type": "message",
            "role": "assistant",
            "status": status,
            "content": [text_part(text)],
        }

    def function_call(
        self, call_id: str, name: str, arguments: str, status: str, item_id: str = ""
    ) -> dict[str, Any]:
        return {
            "id": item_id or self.new_id("fc"),
            "type": "function_call",
            "call_id": call_id,
            "name": name,
            "arguments": arguments,
            "status": status,
        }

    def reasoning(self, text: str, status: str, item_id: str = "") -> dict[str, Any]:
        return {
            "id": item_id or self.new_id("rs"),
            "type": "reasoning",
            "summary": [],
            "content": [reasoning_part(text)],
            "status": status,
        }


def text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def reasoning_part(text: str) -> dict[str, Any]:
    return {"type": "reasoning_text", "text": text}


class _OpenItem:
    """The output item being streamed: its kind, index, id and what it has gathered."""

    __slots__ = ("call_id", "id", "index", "kind", "name", "parts")

    def __init__(
        self, kind: str, index: int, item_id: str, call_id: str = "", name: str = ""
    ) -> None:
        self.kind = kind
        self.index = index
        self.id = item_id
        self.call_id = call_id
        self.name = name
        self.parts: list[str] = []


class ResponseEvents:
    """The event sequence of one streamed response."""

    def __init__(self, response_id: str, response: ResponseFactory) -> None:
        self.items = OutputItems(response_id)
        self._response = response
        self._sequence = 0
        self._open: _OpenItem | None = None
        self._done: list[dict[str, Any]] = []

    def _event(self, kind: str, **fields: Any) -> bytes:
        payload = {"type": kind, "sequence_number": self._sequence, **fields}
        self._sequence += 1
        return sse_event(kind, payload)

    def opening(self) -> list[bytes]:
        snapshot = self._response("in_progress", [])
        return [
            self._event("response.created", response=snapshot),
            self._event("response.in_progress", response=snapshot),
        ]

    def _start(self, kind: str, call_id: str = "", name: str = "") -> list[bytes]:
        frames = self._finish_item()
        index = len(self._done)
        if kind == "message":
            item_id = self.items.new_id("msg")
            item = {
                "id": item_id,
                "type": "message",
                "role": "assistant",
                "status": "in_progress",
                "content": [],
            }
            part: dict[str, Any] | None = text_part("")
        elif kind == "reasoning":
            item_id = self.items.new_id("rs")
            item = {
                "id": item_id,
                "type": "reasoning",
                "summary": [],
                "content": [],
                "status": "in_progress",
            }
            part = reasoning_part("")
        else:
            item_id = self.items.new_id("fc")
            item = self.items.function_call(call_id, name, "", "in_progress", item_id)
            part = None
        self._open = _OpenItem(kind, index, item_id, call_id, name)
        frames.append(self._event("response.output_item.added", output_index=index, item=item))
        if part is not None:
            frames.append(
                self._event(
                    "response.content_part.added",
                    item_id=item_id,
                    output_index=index,
                    content_index=0,
                    part=part,
                )
            )
        return frames

    def _finish_item(self, status: str = "completed") -> list[bytes]:
        item = self._open
        if item is None:
            return []
        self._open = None
        text = "".join(item.parts)
        where = {"item_id": item.id, "output_index": item.index}
        frames: list[bytes] = []
        if item.kind == "message":
            frames.append(
                self._event(
                    "response.output_text.done", **where, content_index=0, text=text, logprobs=[]
                )
            )
            frames.append(
                self._event(
                    "response.content_part.done", **where, content_index=0, part=text_part(text)
                )
            )
            done = self.items.message(text, status, item.id)
        elif item.kind == "reasoning":
            frames.append(
                self._event("response.reasoning_text.done", **where, content_index=0, text=text)
            )
            frames.append(
                self._event(
                    "response.content_part.done",
                    **where,
                    content_index=0,
                    part=reasoning_part(text),
                )
            )
            done = self.items.reasoning(text, "completed", item.id)
        else:
            frames.append(
                self._event(
                    "response.function_call_arguments.done", **where, name=item.name, arguments=text
                )
            )
            done = self.items.function_call(item.call_id, item.name, text, "completed", item.id)
        frames.append(self._event("response.output_item.done", output_index=item.index, item=done))
        self._done.append(done)
        return frames

    def delta(self, delta: types_pb2.TextDelta) -> list[bytes]:
        frames: list[bytes] = []
        if delta.reasoning:
            if self._open is None or self._open.kind != "reasoning":
                frames += self._start("reasoning")
            frames.append(
                self._append("response.reasoning_text.delta", delta.reasoning, content_index=0)
            )
        if delta.text:
            if self._open is None or self._open.kind != "message":
                frames += self._start("message")
            frames.append(
                self._append("response.output_text.delta", delta.text, content_index=0, logprobs=[])
            )
        for piece in delta.tool_calls:
            if piece.id:
                frames += self._start("function_call", piece.id, piece.name)
            if piece.arguments and self._open is not None and self._open.kind == "function_call":
                frames.append(
                    self._append("response.function_call_arguments.delta", piece.arguments)
                )
        return frames

    def _append(self, kind: str, text: str, **fields: Any) -> bytes:
        item = self._open
        assert item is not None
        item.parts.append(text)
        return self._event(kind, item_id=item.id, output_index=item.index, delta=text, **fields)

    def closing(self, end: types_pb2.StreamEnd, status: str) -> list[bytes]:
        frames = self._finish_item("completed" if status == "completed" else "incomplete")
        if not self._done:
            # An answer with no text and no calls is still one (empty) message, as whole() has.
            frames += self._start("message")
            frames += self._finish_item(status)
        kind = "response.completed" if status == "completed" else "response.incomplete"
        frames.append(self._event(kind, response=self._response(status, self._done, end)))
        return frames

    def failure(self, error: HttpError) -> list[bytes]:
        return [self._event("error", code=error.code, message=error.message, param=error.param)]
