"""Output constraints for constrained decoding: what a sequence's tokens must spell.

A `Constraint` is a grammar in llguidance's Lark dialect (which embeds JSON schemas with
`%json { ... }`, regexes and literal alternatives), optionally lazy: with a `trigger`, the text
is free until the trigger has been generated, and only what follows it is constrained (how
`tool_choice: auto` lets the model answer in prose or start a tool call).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Constraint:
    # The grammar, in llguidance's Lark syntax; its start rule is `start`.
    lark: str
    # Where it came from, for errors, logs and metrics: "json_schema", "regex", "tool_calls"...
    kind: str
    # Lazy constraint: the text is free until it contains this string; the grammar then
    # constrains what follows it. None: the grammar constrains the output from its first token.
    trigger: str | None = None
