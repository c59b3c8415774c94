"""Restores placeholders in a token stream, also when one is split across chunks."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping


class Rehydrator:
    """Feeds on stream chunks and returns text with known placeholders restored.

    Only a tail that could still grow into a known placeholder is held back (at most one
    placeholder's length), never the stream; unknown or mangled placeholders pass through as
    they are.
    """

    def __init__(self, placeholders: Mapping[str, str]) -> None:
        self._values = dict(placeholders)
        self._pattern = re.compile("|".join(re.escape(p) for p in self._values))
        self._longest = max(len(p) for p in self._values)
        self._pending = ""

    def feed(self, chunk: str) -> str:
        text = self._pending + chunk if self._pending else chunk
        cut = self._hold_from(text)
        self._pending = text[cut:]
        return self._restore(text[:cut])

    def flush(self) -> str:
        """The held-back tail at the end of the stream: it never became a placeholder."""
        text, self._pending = self._pending, ""
        return self._restore(text)

    def _restore(self, text: str) -> str:
        if "<" not in text:
            return text
        return self._pattern.sub(lambda m: self._values[m.group()], text)

    def _hold_from(self, text: str) -> int:
        # A placeholder that starts earlier than this is either complete or impossible.
        index = text.find("<", max(0, len(text) - self._longest + 1))
        while index != -1:
            tail = text[index:]
            if any(p.startswith(tail) and p != tail for p in self._values):
                return index
            index = text.find("<", index + 1)
        return len(text)


class JsonRehydrator(Rehydrator):
    """A Rehydrator for tool-call arguments, which are JSON text streamed in fragments.

    A placeholder the model wrote inside a JSON string gets its value JSON-escaped (a quote or
    backslash in the value must not end the string); one written bare, outside any string, gets
    the value as a quoted JSON string, so the arguments stay valid JSON either way. Whether a
    position is inside a string is tracked over everything released so far.
    """

    def __init__(self, placeholders: Mapping[str, str]) -> None:
        super().__init__(placeholders)
        self._in_string = False
        self._escaped = False

    def _restore(self, text: str) -> str:
        parts: list[str] = []
        position = 0
        for match in self._pattern.finditer(text) if "<" in text else ():
            self._scan(text[position : match.start()])
            parts.append(text[position : match.start()])
            quoted = json.dumps(self._values[match.group()], ensure_ascii=False)
            parts.append(quoted[1:-1] if self._in_string else quoted)
            position = match.end()
        self._scan(text[position:])
        parts.append(text[position:])
        return "".join(parts)

    def _scan(self, text: str) -> None:
        # Placeholders hold no quote or backslash, so scanning around them is enough.
        if not self._in_string and '"' not in text:
            return
        in_string, escaped = self._in_string, self._escaped
        for char in text:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = in_string
            elif char == '"':
                in_string = not in_string
        self._in_string, self._escaped = in_string, escaped
