"""Output constraints for constrained decoding: what a sequence's tokens must spell.

A `Constraint` is a grammar in llguidance's Lark dialect (which embeds JSON schemas with
`%json { ... }`, regexes and literal alternatives), optionally lazy: with a `trigger`, the text
is free until the trigger has been generated, and only what follows it is constrained (how
`tool_choice: auto` lets the model answer in prose or start a tool call).

`from_proto` turns the contract's OutputConstraint into a Constraint; `Grammars` compiles
constraints against one model's vocabulary (llguidance) and computes token masks for a step's
constrained sequences at once; a `Guide` follows one sequence through its grammar.
"""

from __future__ import annotations

import collections
import ctypes
import enum
import json
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import llama_cpp as C
import llguidance
import llguidance.gbnf_to_lark
import numpy as np
import numpy.typing as npt

from inference_local.llama_api import Model
from slm.errors import Internal, InvalidArgument
from slm.v1 import types_pb2


@dataclass(frozen=True)
class Constraint:
    # The grammar, in llguidance's Lark syntax; its start rule is `start`.
    lark: str
    # Where it came from, for errors, logs and metrics: "json_schema", "regex", "tool_calls"...
    kind: str
    # Lazy constraint: the text is free until it contains this string; the grammar then
    # constrains what follows it. None: the grammar constrains the output from its first token.
    trigger: str | None = None


# The kinds the contract's OutputConstraint carries; their errors name the request field.
_PROTO_KINDS = ("json_object", "json_schema", "regex", "choice", "grammar")
# llguidance's messages quote the grammar; a whole schema in an error is more noise than help.
_MAX_REASON = 2000


def _field(kind: str) -> str:
    return f"sampling.constraint.{kind}" if kind in _PROTO_KINDS else "tools"


def json_schema_lark(schema: dict[str, Any]) -> str:
    """A Lark grammar whose start rule is JSON valid against `schema`. Whitespace between
    tokens is left out unless the schema's `x-guidance` says otherwise: a small model given
    the freedom can spend its whole budget on newlines, and compact JSON is what OpenAI's
    structured outputs return too."""
    options = dict(schema.get("x-guidance") or {})
    options.setdefault("whitespace_flexible", False)
    return "start: %json " + json.dumps({**schema, "x-guidance": options})


def from_proto(c: types_pb2.OutputConstraint) -> Constraint | None:
    """The constraint a request asks for; None when it sets no kind. Malformed input is an
    InvalidArgument naming `sampling.constraint.<kind>`; whether the grammar compiles is
    checked against the model's vocabulary later (`Grammars.compile`)."""
    kind = c.WhichOneof("kind")
    if kind is None:
        return None
    field = _field(kind)
    if kind == "json_object":
        return Constraint(json_schema_lark({"type": "object"}), kind)
    if kind == "json_schema":
        if not c.json_schema.schema.strip():
            raise InvalidArgument("json_schema.schema must not be empty", field=field)
        try:
            schema = json.loads(c.json_schema.schema)
        except json.JSONDecodeError as error:
            raise InvalidArgument(
                f"json_schema.schema is not valid JSON: {error}", field=field
            ) from None
        if not isinstance(schema, dict):
            raise InvalidArgument("json_schema.schema must be a JSON object", field=field)
        return Constraint(json_schema_lark(schema), kind)
    if kind == "regex":
        if not c.regex:
            raise InvalidArgument("regex must not be empty", field=field)
        return Constraint(f"start: /{llguidance.regex_to_lark(c.regex, '')}/", kind)
    if kind == "choice":
        choices = list(c.choice.choices)
        if not choices or any(not s for s in choices):
            raise InvalidArgument("choice needs at least one non-empty string", field=field)
        return Constraint("start: " + " | ".join(json.dumps(s) for s in choices), kind)
    # grammar
    source = c.grammar.source
    if not source.strip():
        raise InvalidArgument("grammar.source must not be empty", field=field)
    if c.grammar.syntax == types_pb2.GRAMMAR_SYNTAX_LARK:
        return Constraint(source, kind)
    if c.grammar.syntax == types_pb2.GRAMMAR_SYNTAX_GBNF:
        try:
            return Constraint(llguidance.gbnf_to_lark.gbnf_to_lark(source), kind)
        except Exception as error:  # the converter raises its own and plain errors
            raise InvalidArgument(f"grammar is not valid GBNF: {error}", field=field) from None
    raise InvalidArgument("grammar.syntax must be GBNF or LARK", field=field)


def _tokenizer(model: Model) -> llguidance.LLTokenizer:
    """llguidance's view of a llama.cpp vocabulary, as `llguidance.llamacpp` builds it (minus
    its deprecated llama.cpp calls): every token's bytes, control tokens marked with a 0xFF
    prefix so that no grammar spells them, and llama.cpp's tokenizer for text it must read."""
    tokens: list[bytes] = []
    eog: list[int] = []
    for token in range(model.n_vocab):
        piece = model.piece(token, special=True)
        attr = model.token_attr(token)
        if attr & C.LLAMA_TOKEN_ATTR_CONTROL or (
            attr & C.LLAMA_TOKEN_ATTR_USER_DEFINED
            and piece.startswith(b"<")
            and piece.endswith(b">")
        ):
            piece = b"\xff" + piece
        tokens.append(piece)
        if model.is_eog(token):
            eog.append(token)
    tokenize = ctypes.cast(C.llama_cpp._lib.llama_tokenize, ctypes.c_void_p).value
    # Every end-of-generation token (Gemma 3 ends a turn with <end_of_turn>, not <eos>) is
    # allowed where the grammar accepts.
    return llguidance.LLTokenizer.from_llamacpp(  # type: ignore[attr-defined,no-any-return]
        tokens=tokens, vocab_ptr=model.vocab, tokenize_fptr=tokenize, eos_token=eog or model.eos
    )


class Outcome(enum.Enum):
    """What a sampled token did to a sequence's grammar."""

    GOING = "going"  # more may follow
    COMPLETE = "complete"  # the grammar is done: nothing but EOS may follow
    REJECTED = "rejected"  # the text after a trigger is not in the grammar


@dataclass(frozen=True)
class Grammar:
    """A constraint compiled for one model: a matcher in its start state, copied per
    sequence (a copy costs microseconds, a compile milliseconds)."""

    constraint: Constraint
    _prototype: llguidance.LLMatcher
    _tokenizer: llguidance.LLTokenizer

    def start(self) -> Guide:
        return Guide(self.constraint, self._prototype.deep_copy(), self._tokenizer)


class Guide:
    """One sequence's position in its grammar. Used only by the decode thread (and the mask
    thread while the decode thread waits for it)."""

    def __init__(
        self,
        constraint: Constraint,
        matcher: llguidance.LLMatcher,
        tokenizer: llguidance.LLTokenizer,
    ) -> None:
        self.constraint = constraint
        self.matcher = matcher
        self._tokenizer = tokenizer
        self._trigger = constraint.trigger.encode() if constraint.trigger else b""
        # Whether the grammar constrains the next token; a lazy one waits for its trigger.
        self.active = not self._trigger
        self._seen = b""

    def accept(self, token: int, piece: bytes) -> Outcome:
        """Advance past a sampled token (not an end-of-generation one) whose bytes are
        `piece`. A token the mask allowed that the matcher then refuses is a bug: Internal."""
        if not self.active:
            return self._watch(piece)
        if not self.matcher.consume_token(token):
            raise Internal(f"constrained decoding lost its grammar: {self.error()}")
        return Outcome.COMPLETE if self.matcher.is_stopped() else Outcome.GOING

    def _watch(self, piece: bytes) -> Outcome:
        """Look for the trigger in the text so far; once found, the grammar takes over and
        first reads what followed the trigger in the same token."""
        seen = self._seen + piece
        at = seen.find(self._trigger)
        if at < 0:
            # Keep only what could still be the start of the trigger.
            # (From the end: `seen` may still be shorter than the trigger.)
            keep = len(self._trigger) - 1
            self._seen = seen[-keep:] if keep else b""
            return Outcome.GOING
        self.active = True
        self._seen = b""
        rest = seen[at + len(self._trigger) :]
        if rest and not self.matcher.consume_tokens(self._tokenizer.tokenize_bytes(rest)):
            return Outcome.REJECTED
        return Outcome.COMPLETE if self.matcher.is_stopped() else Outcome.GOING

    def error(self) -> str:
        return self.matcher.get_error() or "the grammar allows no token here"


class Grammars:
    """Constrained decoding for one model: llguidance's view of its vocabulary (built on first
    use: seconds for a 262k vocabulary, so off the event loop), compiled grammars in a small
    LRU keyed by their text, and the token masks of a step's sequences computed together on
    llguidance's own threads (which run without the GIL)."""

    def __init__(self, model: Model, *, cache_size: int = 32, mask_threads: int = 1) -> None:
        self._model = model
        self._cache_size = cache_size
        self._mask_threads = mask_threads
        self._lock = threading.Lock()
        self._build_lock = threading.Lock()
        self._tokenizer: llguidance.LLTokenizer | None = None
        self._executor: llguidance.LLExecutor | None = None
        self._cache: collections.OrderedDict[str, Grammar] = collections.OrderedDict()
        # Words of 32 tokens in a mask row.
        self.words = (model.n_vocab + 31) // 32

    def tokenizer(self) -> llguidance.LLTokenizer:
        """Built once, on first use (blocking)."""
        with self._build_lock:
            if self._tokenizer is None:
                self._tokenizer = _tokenizer(self._model)
                self._executor = llguidance.LLExecutor(self._mask_threads)
            return self._tokenizer

    @property
    def ready(self) -> bool:
        """Whether the vocabulary is built, so a cached compile is instant."""
        return self._tokenizer is not None

    def cached(self, constraint: Constraint) -> Grammar | None:
        """The compiled grammar if it is in the cache (never blocks for long)."""
        with self._lock:
            grammar = self._cache.get(constraint.lark)
            if grammar is None:
                return None
            self._cache.move_to_end(constraint.lark)
        if grammar.constraint != constraint:  # same grammar, other trigger or kind
            grammar = Grammar(constraint, grammar._prototype, grammar._tokenizer)
        return grammar

    def compile(self, constraint: Constraint) -> Grammar:
        """Compile (or take from the cache) a constraint; blocking, milliseconds for a
        typical schema, seconds the first time (the vocabulary). A grammar llguidance cannot
        compile is an InvalidArgument with its reason."""
        grammar = self.cached(constraint)
        if grammar is not None:
            return grammar
        tokenizer = self.tokenizer()
        matcher = llguidance.LLMatcher(
            tokenizer, llguidance.LLMatcher.grammar_from_lark(constraint.lark), log_level=0
        )
        if matcher.is_error():
            reason = matcher.get_error()
            if len(reason) > _MAX_REASON:
                reason = reason[:_MAX_REASON] + "..."
            raise InvalidArgument(
                f"{constraint.kind} cannot be compiled: {reason}",
                field=_field(constraint.kind),
                reason="CONSTRAINT_NOT_COMPILABLE",
            )
        grammar = Grammar(constraint, matcher, tokenizer)
        with self._lock:
            self._cache[constraint.lark] = grammar
            self._cache.move_to_end(constraint.lark)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return grammar

    def new_masks(self, rows: int) -> npt.NDArray[np.int32]:
        """Zeroed mask rows (a bit per token), to be filled by `fill`."""
        return np.zeros((rows, self.words), np.int32)

    def fill(self, guides: Sequence[Guide], masks: npt.NDArray[np.int32]) -> None:
        """Write guide i's mask of allowed next tokens into row i, all guides at once on
        llguidance's threads (the GIL is let go for the whole call)."""
        if not guides:
            return
        assert self._executor is not None
        assert masks.flags["C_CONTIGUOUS"]
        assert masks.dtype == np.int32
        assert masks.shape == (len(guides), self.words)
        self._executor.unsafe_compute_mask_ptr(
            [(guide.matcher, i) for i, guide in enumerate(guides)],
            masks.ctypes.data,
            self.words * 4,
            len(guides),
        )
