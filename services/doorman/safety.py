"""The safety filter: deny patterns refuse an input, and redact or end an output."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from slm.errors import InvalidArgument

REDACTED = "[redacted]"


class InputRefused(InvalidArgument):
    """An input message matched a deny pattern of the safety filter."""

    reason = "SAFETY_INPUT_REFUSED"


@dataclass(frozen=True, slots=True)
class Filtered:
    """What an output filter lets through, and whether the stream must end here."""

    text: str
    stop: bool = False


class OutputFilter:
    """One stream's output filter: holds back a short window so split matches are still caught."""

    def __init__(self, pattern: re.Pattern[str], redact: bool, window: int) -> None:
        self._pattern = pattern
        self._redact = redact
        self._window = window
        self._pending = ""
        self.triggered = False

    def feed(self, chunk: str) -> Filtered:
        text = self._pending + chunk
        match = self._pattern.search(text)
        if match is not None and not self._redact:
            self.triggered = True
            self._pending = ""
            return Filtered(text[: match.start()], stop=True)
        if match is not None:
            self.triggered = True
            text = self._pattern.sub(REDACTED, text)
        cut = max(0, len(text) - self._window)
        self._pending = text[cut:]
        return Filtered(text[:cut])

    def flush(self) -> str:
        text, self._pending = self._pending, ""
        return text


class SafetyFilter:
    def __init__(
        self,
        input_deny: Iterable[str],
        output_deny: Iterable[str],
        *,
        redact: bool = True,
        window: int = 64,
    ) -> None:
        self._input = [re.compile(p, re.IGNORECASE) for p in input_deny]
        outputs = [f"(?:{p})" for p in output_deny]
        self._output = re.compile("|".join(outputs), re.IGNORECASE) if outputs else None
        self._redact = redact
        self._window = window

    @property
    def filters_output(self) -> bool:
        return self._output is not None

    def check_input(self, texts: Iterable[str]) -> None:
        """Check the messages' texts; the error names the message."""
        self.check_fields((f"messages[{i}].content", text) for i, text in enumerate(texts))

    def check_fields(self, fields: Iterable[tuple[str, str]]) -> None:
        """Check (field, text) pairs of a request: message contents, but also tool-call
        arguments and tool descriptions, which reach the model as text too."""
        for field, text in fields:
            for rule, pattern in enumerate(self._input):
                if pattern.search(text):
                    raise InputRefused(
                        f"the request was refused by the safety filter: {field} matches "
                        f"deny rule {rule}",
                        field=field,
                        metadata={"rule": str(rule)},
                    )

    def output_filter(self) -> OutputFilter | None:
        if self._output is None:
            return None
        return OutputFilter(self._output, self._redact, self._window)
