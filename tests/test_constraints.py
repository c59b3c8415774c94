"""Output constraints: the contract's kinds, compile errors with llguidance's reasons, the JSON
schema subset OpenAI's strict mode uses, and a lazy constraint's trigger, on the real vocabulary."""

from __future__ import annotations

import concurrent.futures
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from inference_local.constraints import (
    Constraint,
    Grammar,
    Grammars,
    Outcome,
    from_proto,
    json_schema_lark,
)
from inference_local.llama_api import Model
from slm.errors import InvalidArgument
from slm.v1 import types_pb2 as pb

STRICT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "$defs": {
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
            "required": ["city", "zip"],
            "additionalProperties": False,
        }
    },
    "properties": {
        "name": {"type": "string"},
        "role": {"type": "string", "enum": ["admin", "user"]},
        "home": {"$ref": "#/$defs/address"},
        "matrix": {"type": "array", "items": {"type": "array", "items": {"type": "integer"}}},
        "contact": {
            "anyOf": [
                {"type": "null"},
                {
                    "type": "object",
                    "properties": {"email": {"type": "string"}},
                    "required": ["email"],
                    "additionalProperties": False,
                },
            ]
        },
    },
    "required": ["name", "role", "home", "matrix", "contact"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def model(model_path: Path) -> Iterator[Model]:
    model = Model(model_path, vocab_only=True)
    yield model
    model.close()


@pytest.fixture(scope="module")
def grammars(model: Model) -> Grammars:
    return Grammars(model)


def schema(value: object) -> pb.OutputConstraint:
    return pb.OutputConstraint(json_schema=pb.JsonSchemaConstraint(schema=json.dumps(value)))


def accepts(model: Model, grammar: Grammar, text: str) -> bool:
    """Whether the grammar takes `text`, as the model tokenizes it, and is then satisfied."""
    guide = grammar.start()
    for token in model.tokenize(text, add_special=False):
        if not guide.matcher.consume_token(token):
            return False
    return bool(guide.matcher.is_accepting())


def test_no_kind_is_no_constraint() -> None:
    assert from_proto(pb.OutputConstraint()) is None


def test_every_kind_compiles_and_takes_what_it_describes(model: Model, grammars: Grammars) -> None:
    cases: list[tuple[pb.OutputConstraint, str, str, str]] = [
        (pb.OutputConstraint(json_object=pb.JsonObjectConstraint()), "json_object",
         '{"a":1}', "[1]"),
        (schema({"type": "object", "properties": {"n": {"type": "integer"}}}), "json_schema",
         '{"n":3}', '{"n":"3"}'),
        (pb.OutputConstraint(regex=r"\d{3}/[a-z]+"), "regex", "123/abc", "12/abc"),
        (pb.OutputConstraint(choice=pb.ChoiceConstraint(choices=["yes", "no"])), "choice",
         "no", "maybe"),
        (pb.OutputConstraint(grammar=pb.Grammar(
            syntax=pb.GRAMMAR_SYNTAX_LARK, source='start: "a" B\nB: /[0-9]+/')),
         "grammar", "a42", "b42"),
        (pb.OutputConstraint(grammar=pb.Grammar(
            syntax=pb.GRAMMAR_SYNTAX_GBNF, source='root ::= "x" [0-9]+')),
         "grammar", "x7", "y7"),
    ]  # fmt: skip
    for proto, kind, good, bad in cases:
        constraint = from_proto(proto)
        assert constraint is not None
        assert constraint.kind == kind
        assert constraint.trigger is None
        grammar = grammars.compile(constraint)
        assert accepts(model, grammar, good), (kind, good)
        assert not accepts(model, grammar, bad), (kind, bad)


def test_openai_strict_schema_subset_compiles_and_is_enforced(
    model: Model, grammars: Grammars
) -> None:
    constraint = from_proto(schema(STRICT_SCHEMA))
    assert constraint is not None
    grammar = grammars.compile(constraint)
    good = {
        "name": "Ann",
        "role": "admin",
        "home": {"city": "Oslo", "zip": "0150"},
        "matrix": [[1, 2], [], [3]],
        "contact": {"email": "a@b.c"},
    }
    assert accepts(model, grammar, json.dumps(good, separators=(",", ":")))
    assert accepts(model, grammar, json.dumps({**good, "contact": None}, separators=(",", ":")))
    for bad in (
        {**good, "role": "root"},  # not in the enum
        {**good, "extra": 1},  # additionalProperties false
        {k: v for k, v in good.items() if k != "home"},  # required
        {**good, "home": {"city": "Oslo"}},  # required inside a $ref
        {**good, "matrix": [[1.5]]},  # nested integer arrays
        {**good, "contact": {"phone": "1"}},  # no branch of the anyOf
    ):
        assert not accepts(model, grammar, json.dumps(bad, separators=(",", ":"))), bad


@pytest.mark.parametrize(
    ("proto", "field", "message"),
    [
        (pb.OutputConstraint(json_schema=pb.JsonSchemaConstraint(schema="{nope")),
         "sampling.constraint.json_schema", "not valid JSON"),
        (pb.OutputConstraint(json_schema=pb.JsonSchemaConstraint(schema="")),
         "sampling.constraint.json_schema", "must not be empty"),
        (schema([1, 2]), "sampling.constraint.json_schema", "must be a JSON object"),
        (pb.OutputConstraint(choice=pb.ChoiceConstraint()), "sampling.constraint.choice",
         "at least one"),
        (pb.OutputConstraint(choice=pb.ChoiceConstraint(choices=["a", ""])),
         "sampling.constraint.choice", "non-empty"),
        (pb.OutputConstraint(regex=""), "sampling.constraint.regex", "must not be empty"),
        (pb.OutputConstraint(grammar=pb.Grammar(source="start: a")),
         "sampling.constraint.grammar", "GBNF or LARK"),
        (pb.OutputConstraint(grammar=pb.Grammar(
            syntax=pb.GRAMMAR_SYNTAX_GBNF, source='root ::= "x')),
         "sampling.constraint.grammar", "not valid GBNF"),
    ],
)  # fmt: skip
def test_malformed_constraints_are_refused(
    proto: pb.OutputConstraint, field: str, message: str
) -> None:
    with pytest.raises(InvalidArgument, match=message) as caught:
        from_proto(proto)
    assert caught.value.field == field


@pytest.mark.parametrize(
    ("proto", "field", "reason"),
    [
        (schema({"type": "strin"}), "sampling.constraint.json_schema", "Invalid type: strin"),
        (pb.OutputConstraint(regex="[a-"), "sampling.constraint.regex", "unclosed character class"),
        (pb.OutputConstraint(grammar=pb.Grammar(
            syntax=pb.GRAMMAR_SYNTAX_LARK, source="start: foo")),
         "sampling.constraint.grammar", 'unknown name: "foo"'),
    ],
)  # fmt: skip
def test_compile_errors_carry_llguidance_s_reason(
    grammars: Grammars, proto: pb.OutputConstraint, field: str, reason: str
) -> None:
    constraint = from_proto(proto)
    assert constraint is not None
    with pytest.raises(InvalidArgument, match="cannot be compiled") as caught:
        grammars.compile(constraint)
    assert caught.value.field == field
    assert reason in caught.value.message
    # A tool-call grammar's error names the tools, not a constraint field.
    with pytest.raises(InvalidArgument) as caught:
        grammars.compile(Constraint(constraint.lark, "tool_calls", trigger="<call>"))
    assert caught.value.field == "tools"


def test_compiled_grammars_are_cached_per_text(grammars: Grammars) -> None:
    constraint = Constraint(json_schema_lark({"type": "object"}), "json_object")
    first = grammars.compile(constraint)
    assert grammars.cached(constraint) is first
    lazy = grammars.cached(Constraint(constraint.lark, "tool_calls", trigger="<x>"))
    assert lazy is not None
    assert lazy.constraint.trigger == "<x>"


def test_json_is_compact_unless_the_schema_says_otherwise(model: Model, grammars: Grammars) -> None:
    compact = grammars.compile(Constraint(json_schema_lark({"type": "object"}), "json_object"))
    assert not accepts(model, compact, '{ "a": 1 }')
    spaced = grammars.compile(
        Constraint(
            json_schema_lark({"type": "object", "x-guidance": {"whitespace_flexible": True}}),
            "json_object",
        )
    )
    assert accepts(model, spaced, '{ "a": 1 }')


def test_lazy_guide_waits_for_its_trigger_split_across_tokens(
    model: Model, grammars: Grammars
) -> None:
    lark = 'start: "(" /[0-9]+/ ")"'
    grammar = grammars.compile(Constraint(lark, "tool_calls", trigger="<call>"))
    guide = grammar.start()
    pieces = [b"Sure, ", b"<ca", b"ll>(4", b"2", b")"]
    outcomes = []
    for piece in pieces:
        # Until the trigger, only the bytes count; then the matcher reads the token.
        token = model.tokenize(piece.decode(), add_special=False)[0] if guide.active else -1
        outcomes.append(guide.accept(token, piece))
    assert outcomes == [
        Outcome.GOING,
        Outcome.GOING,
        Outcome.GOING,
        Outcome.GOING,
        Outcome.COMPLETE,
    ]
    assert guide.active

    # Pieces shorter than the trigger from the very start, as a model writes them token by
    # token: none of their bytes may be forgotten while the trigger is incomplete.
    early = grammar.start()
    for piece in [b"A", b" <", b"ca", b"ll", b">"]:
        assert early.accept(-1, piece) is Outcome.GOING
    assert early.active

    rejected = grammar.start()
    assert rejected.accept(0, b"<call>") is Outcome.GOING
    assert rejected.active
    assert grammar.start().accept(0, b"x <call>[") is Outcome.REJECTED


def test_pieces_read_on_two_threads_at_once_are_each_their_own(model: Model) -> None:
    """The mask thread reads every piece of the vocabulary while the decode thread reads the
    pieces it samples, and llama_token_to_piece runs without the GIL: each must get its own
    token's bytes (a shared buffer once gave the decode thread another token's)."""
    tokens = range(0, model.n_vocab, 7)
    expected = [model.piece(t, special=True) for t in tokens]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda _: [model.piece(t, special=True) for t in tokens], range(4)))
    assert all(result == expected for result in results)
