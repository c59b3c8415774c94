"""Restores placeholders in a token stream, also when one is split across chunks."""

from __future__ import annotations

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
