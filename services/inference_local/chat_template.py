"""Renders chat messages into a prompt with a model's Jinja chat template."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from slm.errors import InvalidArgument


@dataclass(frozen=True)
class Message:
    role: str
    content: str


class ChatTemplate:
    """A compiled template; sandboxed because templates may come from untrusted GGUF files."""

    def __init__(self, source: str, bos_token: str, eos_token: str) -> None:
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

        def raise_exception(message: str) -> None:
            raise InvalidArgument(f"chat template: {message}", field="messages")

        env.globals["raise_exception"] = raise_exception
        self._template = env.from_string(source)
        self._bos = bos_token
        self._eos = eos_token

    def render(self, messages: Sequence[Message]) -> str:
        try:
            return self._template.render(
                messages=[{"role": m.role, "content": m.content} for m in messages],
                bos_token=self._bos,
                eos_token=self._eos,
                add_generation_prompt=True,
            )
        except jinja2.TemplateError as error:
            raise InvalidArgument(f"chat template failed: {error}", field="messages") from error
