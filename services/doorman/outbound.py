"""The way back: rehydration and the output filter on every text of a stream's deltas.

A delta carries up to three texts per choice: the answer, the reasoning and tool-call argument
fragments. Each (choice, text, call) is its own channel with its own rehydrator and output
filter, so a placeholder or a deny match split across fragments is caught within its channel and
never mixed with another choice's or call's text.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from doorman.rehydrate import JsonRehydrator, Rehydrator
from doorman.safety import OutputFilter
from slm.v1 import types_pb2

# (choice index, "text" | "reasoning" | "arguments", tool-call index)
ChannelKey = tuple[int, str, int]


@dataclass
class _Channel:
    rehydrator: Rehydrator | None
    output: OutputFilter | None

    def feed(self, text: str) -> tuple[str, bool]:
        if self.rehydrator is not None:
            text = self.rehydrator.feed(text)
        if self.output is not None:
            filtered = self.output.feed(text)
            return filtered.text, filtered.stop
        return text, False

    def flush(self) -> str:
        tail = self.rehydrator.flush() if self.rehydrator is not None else ""
        if self.output is not None:
            filtered = self.output.feed(tail)
            tail = filtered.text + ("" if filtered.stop else self.output.flush())
        return tail


@dataclass
class Outbound:
    """Applies the Doorman's output policy to one stream, delta by delta."""

    placeholders: Mapping[str, str]
    output_filter: Callable[[], OutputFilter | None]
    _channels: dict[ChannelKey, _Channel] = field(default_factory=dict)

    def _channel(self, key: ChannelKey) -> _Channel:
        channel = self._channels.get(key)
        if channel is None:
            rehydrator: Rehydrator | None = None
            if self.placeholders:
                rehydrator = (
                    JsonRehydrator(self.placeholders)
                    if key[1] == "arguments"
                    else Rehydrator(self.placeholders)
                )
            channel = self._channels[key] = _Channel(rehydrator, self.output_filter())
        return channel

    def feed(self, delta: types_pb2.TextDelta) -> tuple[bool, bool]:
        """Rewrites `delta` in place; returns (whether anything is left to send, stop)."""
        choice = delta.choice_index
        stop = False
        if delta.text:
            delta.text, stop = self._channel((choice, "text", 0)).feed(delta.text)
        if stop:
            # Nothing after the match leaves, in whichever text of the delta it sits.
            delta.reasoning = ""
        elif delta.reasoning:
            delta.reasoning, stop = self._channel((choice, "reasoning", 0)).feed(delta.reasoning)
        if stop:
            del delta.tool_calls[:]
        elif delta.tool_calls:
            kept: list[types_pb2.ToolCallDelta] = []
            for call in delta.tool_calls:
                if stop:
                    break
                if call.arguments:
                    key = (choice, "arguments", call.index)
                    call.arguments, stop = self._channel(key).feed(call.arguments)
                # The first piece (id, name) always goes, even if its arguments are held back.
                if call.arguments or call.id or call.name:
                    kept.append(call)
            if len(kept) != len(delta.tool_calls):
                # Copies: the kept messages belong to the field that is about to be cleared.
                retained = [
                    types_pb2.ToolCallDelta(
                        index=c.index, id=c.id, name=c.name, arguments=c.arguments
                    )
                    for c in kept
                ]
                del delta.tool_calls[:]
                delta.tool_calls.extend(retained)
        alive = bool(delta.text or delta.reasoning or delta.tool_calls or delta.logprobs)
        return alive, stop

    def flush(self) -> list[types_pb2.TextDelta]:
        """What the channels still hold at the end of the stream, one delta per choice."""
        tails: dict[int, types_pb2.TextDelta] = {}
        for (choice, kind, index), channel in self._channels.items():
            tail = channel.flush()
            if not tail:
                continue
            delta = tails.setdefault(choice, types_pb2.TextDelta(choice_index=choice))
            if kind == "text":
                delta.text += tail
            elif kind == "reasoning":
                delta.reasoning += tail
            else:
                delta.tool_calls.append(types_pb2.ToolCallDelta(index=index, arguments=tail))
        return [tails[choice] for choice in sorted(tails)]

    @property
    def triggered(self) -> bool:
        """Whether the output filter matched anywhere in the stream."""
        return any(
            channel.output is not None and channel.output.triggered
            for channel in self._channels.values()
        )
