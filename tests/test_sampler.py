"""The sampler's shortlist picks exactly the token llama.cpp's own full-vocabulary path picks."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import llama_cpp as C
import numpy as np
import pytest

from inference_local.llama_api import Batch, Context, ContextParams, Model, Sampler, SamplerConfig

PROMPTS = [
    "Once upon a time, in a small village by the sea,",
    "The three primary colours are",
    "def fibonacci(n):",
    "Paris is the capital of",
]

BASE = SamplerConfig(
    temperature=0.8,
    top_k=40,
    top_p=0.95,
    min_p=0.05,
    repetition_penalty=1.0,
    presence_penalty=0.0,
    frequency_penalty=0.0,
    seed=0,
    logit_bias={},
)


@pytest.fixture(scope="module")
def decoded(model_path: Path) -> Iterator[tuple[Model, Context, list[list[int]]]]:
    """A context holding one output row of logits per prompt."""
    model = Model(model_path)
    context = Context(model, ContextParams(n_seq=len(PROMPTS), n_ctx_per_seq=128))
    batch = Batch(128)
    prompts = [model.tokenize(p, add_special=True) for p in PROMPTS]
    batch.clear()
    for seq, tokens in enumerate(prompts):
        batch.add_many(tokens, 0, seq, True)
    context.decode(batch)
    context.settle_outputs()
    yield model, context, prompts
    batch.close()
    context.close()
    model.close()


def _row(prompts: list[list[int]], seq: int) -> int:
    """The batch index of a prompt's last token (its logits row)."""
    return sum(len(p) for p in prompts[: seq + 1]) - 1


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"temperature": 0.0},
        {"top_k": 1},
        {"temperature": 2.0, "top_p": 1.0, "min_p": 0.0},
        {"logit_bias": {10: 2.0, 20: -5.0, 5000: 30.0}},
        {"repetition_penalty": 1.3},
        {"presence_penalty": -2.0, "frequency_penalty": -1.0},
        {"temperature": 0.0, "presence_penalty": 1.5},
        {"top_k": 0},
    ],
    ids=str,
)
def test_shortlist_picks_what_the_full_vocabulary_picks(
    decoded: tuple[Model, Context, list[list[int]]], changes: dict[str, object]
) -> None:
    model, context, prompts = decoded
    for seed in range(6):
        config = replace(BASE, seed=seed, **changes)  # type: ignore[arg-type]
        for seq, prompt in enumerate(prompts):
            ours, reference = Sampler(model, config), Sampler(model, config)
            ours.accept_prompt(prompt)
            reference.accept_prompt(prompt)
            row = _row(prompts, seq)
            try:
                # Several draws from one row: the RNG and the penalty window move each time.
                for _ in range(6):
                    token = ours.sample(context, row)
                    expected = int(C.llama_sampler_sample(reference.ptr, context.ptr, row))
                    assert token == expected, (changes, seed, seq)
            finally:
                ours.close()
                reference.close()


def test_shortlist_is_small_and_holds_every_biased_token(
    decoded: tuple[Model, Context, list[list[int]]],
) -> None:
    model, context, prompts = decoded
    banned = {0: -100.0, 7: 5.0}
    sampler = Sampler(model, replace(BASE, logit_bias=banned))
    try:
        logits = context.logits(_row(prompts, 0))
        shortlists = Sampler._shortlists([sampler], logits[None, :])
        assert shortlists is not None
        shortlist, ends = shortlists
        assert ends == [shortlist.size]
        ids = shortlist["id"]
        assert 40 < ids.size < model.n_vocab // 20
        assert list(ids) == sorted(ids)
        assert set(banned) <= set(ids.tolist())
        best = np.argsort(logits)[-40:]
        assert set(best.tolist()) <= set(ids.tolist())
        assert np.array_equal(shortlist["logit"], logits[ids])
    finally:
        sampler.close()


def test_chains_needing_the_whole_vocabulary_take_llama_cpp_path(
    decoded: tuple[Model, Context, list[list[int]]],
) -> None:
    model, _, _ = decoded
    for changes in ({"top_k": 0}, {"top_k": model.n_vocab // 150}):
        sampler = Sampler(model, replace(BASE, **changes))  # type: ignore[arg-type]
        try:
            assert sampler._keep == 0, changes
        finally:
            sampler.close()


CHAINS: list[dict[str, object]] = [
    {},
    {"temperature": 0.0},
    {"top_k": 20},
    {"logit_bias": {10: 2.0, 5000: 30.0}},
    {"repetition_penalty": 1.3},
    {"top_k": 0},
]


@pytest.fixture
def stepped(model_path: Path) -> Iterator[tuple[Model, Context, list[list[int]]]]:
    """A context just after a decode step: one token of every sequence, each with its logits,
    so the rows lie one after another in llama.cpp's buffer."""
    model = Model(model_path)
    context = Context(model, ContextParams(n_seq=len(PROMPTS), n_ctx_per_seq=128))
    batch = Batch(128)
    prompts = [model.tokenize(p, add_special=True) for p in PROMPTS]
    batch.clear()
    for seq, tokens in enumerate(prompts):
        batch.add_many(tokens[:-1], 0, seq, False)
    context.decode(batch)
    batch.clear()
    for seq, tokens in enumerate(prompts):
        batch.add(tokens[-1], len(tokens) - 1, seq, True)
    context.decode(batch)
    context.settle_outputs()
    yield model, context, prompts
    batch.close()
    context.close()
    model.close()


def test_a_step_s_rows_are_read_in_place(
    stepped: tuple[Model, Context, list[list[int]]],
) -> None:
    _, context, _ = stepped
    rows = context.logit_rows(range(len(PROMPTS)))
    assert np.shares_memory(rows, context.logits(0))
    for i in range(len(PROMPTS)):
        assert np.array_equal(rows[i], context.logits(i))
    reordered = context.logit_rows([2, 0])
    assert np.array_equal(reordered[0], context.logits(2))
    assert np.array_equal(reordered[1], context.logits(0))


def test_samplers_sampled_together_pick_what_each_picks_alone(
    stepped: tuple[Model, Context, list[list[int]]],
) -> None:
    """Many samplers over one step's rows, in blocks and groups of mixed chains (several of
    them sharing each row), draw by draw against llama.cpp's full-vocabulary path."""
    model, context, prompts = stepped
    # Mixed chains, rows out of order and repeated; then one chain on every row in order,
    # which reads the step's rows in place as one block.
    mixed = [(replace(BASE, seed=i, **c), i % len(PROMPTS)) for i, c in enumerate(CHAINS * 3)]  # type: ignore[arg-type]
    biased = replace(BASE, logit_bias={10: 2.0, 5000: 30.0})
    in_order = [(replace(biased, seed=100 + row), row) for row in range(len(PROMPTS))]
    for configs in (mixed, in_order):
        ours = [Sampler(model, config) for config, _ in configs]
        references = [Sampler(model, config) for config, _ in configs]
        try:
            for sampler, reference, (_, row) in zip(ours, references, configs, strict=True):
                sampler.accept_prompt(prompts[row])
                reference.accept_prompt(prompts[row])
            work = [(sampler, row) for sampler, (_, row) in zip(ours, configs, strict=True)]
            for _ in range(6):
                expected = [
                    int(C.llama_sampler_sample(reference.ptr, context.ptr, row))
                    for reference, (_, row) in zip(references, configs, strict=True)
                ]
                assert Sampler.sample_many(context, work) == expected
        finally:
            for sampler in ours + references:
                sampler.close()
