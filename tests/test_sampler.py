"""The sampler's shortlist picks exactly the token llama.cpp's own full-vocabulary path picks."""

from __future__ import annotations

import concurrent.futures
import ctypes
import itertools
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import llama_cpp as C
import numpy as np
import pytest

from inference_local import llama_api
from inference_local.llama_api import (
    _TOKEN_DATA,
    Batch,
    Context,
    ContextParams,
    Model,
    Sampler,
    SamplerConfig,
)

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


Decoded = tuple[Model, Context, list[list[int]], list[int]]


def _decode(model_path: Path, *, step: bool) -> Iterator[Decoded]:
    """A context holding one output row of logits per prompt, and each row's batch index: the
    rows of whole prompts, or (`step`) of a decode step, one token of every sequence, whose
    rows lie one after another in llama.cpp's buffer."""
    model = Model(model_path)
    context = Context(model, ContextParams(n_seq=len(PROMPTS), n_ctx_per_seq=128))
    batch = Batch(128)
    prompts = [model.tokenize(p, add_special=True) for p in PROMPTS]
    rows = []
    batch.clear()
    for seq, tokens in enumerate(prompts):
        rows.append(batch.add_many(tokens[:-1] if step else tokens, 0, seq, not step))
    if step:
        context.decode(batch)
        batch.clear()
        rows = [
            batch.add(tokens[-1], len(tokens) - 1, seq, True) for seq, tokens in enumerate(prompts)
        ]
    context.decode(batch)
    context.settle_outputs()
    yield model, context, prompts, rows
    batch.close()
    context.close()
    model.close()


@pytest.fixture(scope="module")
def decoded(model_path: Path) -> Iterator[Decoded]:
    yield from _decode(model_path, step=False)


@pytest.fixture(scope="module")
def stepped(model_path: Path) -> Iterator[Decoded]:
    yield from _decode(model_path, step=True)


def _assert_same_tokens(
    decoded: Decoded,
    configs: list[tuple[SamplerConfig, int]],
    *,
    together: bool,
    pool: concurrent.futures.Executor | None = None,
) -> None:
    """Samplers of these (config, sequence) pairs draw 6 times from their sequences' rows (the
    RNG and the penalty window move each time), one by one or all in one sample_many (its tasks
    on `pool`'s threads too, if given), each draw the token llama.cpp's full-vocabulary path
    picks for a twin sampler."""
    model, context, prompts, rows = decoded
    ours = [Sampler(model, config) for config, _ in configs]
    references = [Sampler(model, config) for config, _ in configs]
    try:
        for sampler, reference, (_, seq) in zip(ours, references, configs, strict=True):
            sampler.accept_prompt(prompts[seq])
            reference.accept_prompt(prompts[seq])
        work = [(sampler, rows[seq]) for sampler, (_, seq) in zip(ours, configs, strict=True)]
        for _ in range(6):
            expected = [
                int(C.llama_sampler_sample(reference.ptr, context.ptr, row))
                for reference, (_, row) in zip(references, work, strict=True)
            ]
            if together:
                tokens = Sampler.sample_many(context, work, pool)
            else:
                tokens = [sampler.sample(context, row) for sampler, row in work]
            assert tokens == expected, configs
    finally:
        for sampler in ours + references:
            sampler.close()


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
    decoded: Decoded, changes: dict[str, object]
) -> None:
    for seed in range(6):
        config = replace(BASE, seed=seed, **changes)  # type: ignore[arg-type]
        _assert_same_tokens(decoded, [(config, seq) for seq in range(len(PROMPTS))], together=False)


@pytest.mark.parametrize(
    ("shortlists", "most"),
    [(Sampler._shortlists, 100), (Sampler._wide_shortlists, 262_144 // 20)],
    ids=["tight", "wide"],
)
def test_shortlist_is_small_and_holds_every_biased_token(
    decoded: Decoded, shortlists: Any, most: int
) -> None:
    """The tight shortlist holds the 40 best, a few ties and the moved tokens; the wide one
    (masked rows) some thousands."""
    model, context, _, rows = decoded
    banned = {0: -100.0, 7: 5.0}
    sampler = Sampler(model, replace(BASE, logit_bias=banned))
    try:
        logits = context.logits(rows[0])
        found = shortlists([sampler], logits[None, :])
        assert found is not None
        shortlist, ends = found
        assert ends == [shortlist.size]
        ids = shortlist["id"]
        assert 40 < ids.size < most
        assert list(ids) == sorted(ids)
        assert set(banned) <= set(ids.tolist())
        best = np.argsort(logits)[-40:]
        assert set(best.tolist()) <= set(ids.tolist())
        assert np.array_equal(shortlist["logit"], logits[ids])
    finally:
        sampler.close()


def test_tight_shortlist_holds_the_k_best_among_ties_and_moved_tokens(decoded: Decoded) -> None:
    """Rows of coarse logits (many ties) and moved tokens placed in the groups of the best
    ones: every row's shortlist, in token order, holds each unmoved token at or above its k-th
    best unmoved logit and every moved token, with their own logits."""
    model = decoded[0]
    rng = np.random.default_rng(7)
    rows = (rng.integers(-40, 40, (4, model.n_vocab)) / 4).astype(np.float32)
    width = model.n_vocab // Sampler.SLICES
    samplers = []
    try:
        for keep in (1, 40):
            for r in range(rows.shape[0]):
                best = int(np.argmax(rows[r]))
                bias = {best: -50.0, (best + width) % model.n_vocab: 1.0, r: 3.0}
                samplers.append(Sampler(model, replace(BASE, top_k=keep, logit_bias=bias)))
            block = samplers[-rows.shape[0] :]
            found = Sampler._shortlists(block, rows)
            assert found is not None
            shortlist, ends = found
            for r, (sampler, start, end) in enumerate(
                zip(block, [0, *ends[:-1]], ends, strict=True)
            ):
                ids = shortlist["id"][start:end]
                moved = set(sampler._moved_tokens().tolist())
                unmoved = np.setdiff1d(np.arange(model.n_vocab), list(moved))
                kth = np.sort(rows[r, unmoved])[-keep]
                must = set(unmoved[rows[r, unmoved] >= kth].tolist()) | moved
                assert must <= set(ids.tolist()), (keep, r)
                # The threshold may sit below the k-th best logit when the best tokens share
                # a group; what lies between comes only from the groups that reach it.
                assert len(ids) < len(must) + keep * Sampler.SLICES
                assert list(ids) == sorted(ids)
                assert np.array_equal(shortlist["logit"][start:end], rows[r, ids])
    finally:
        for sampler in samplers:
            sampler.close()


def test_a_row_holding_nan_takes_llama_cpp_path(decoded: Decoded) -> None:
    model = decoded[0]
    rows = np.zeros((2, model.n_vocab), np.float32)
    rows[1, 12345] = np.nan
    sampler = Sampler(model, BASE)
    try:
        assert Sampler._shortlists([sampler, sampler], rows) is None
        assert Sampler._shortlists([sampler], rows[:1]) is not None
    finally:
        sampler.close()


def test_chains_needing_the_whole_vocabulary_take_llama_cpp_path(decoded: Decoded) -> None:
    model = decoded[0]
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


def test_a_step_s_rows_are_read_in_place(stepped: Decoded) -> None:
    context = stepped[1]
    assert stepped[3] == list(range(len(PROMPTS)))
    rows = context.logit_rows(range(len(PROMPTS)))
    assert np.shares_memory(rows, context.logits(0))
    for i in range(len(PROMPTS)):
        assert np.array_equal(rows[i], context.logits(i))
    reordered = context.logit_rows([2, 0])
    assert np.array_equal(reordered[0], context.logits(2))
    assert np.array_equal(reordered[1], context.logits(0))


def test_per_row_calls_keep_the_gil_and_answer_as_llama_cpp_s_own(stepped: Decoded) -> None:
    """The calls made for every row of a step go through PyDLL (they keep the GIL: ctypes
    marks such a function with FUNCFLAG_PYTHONAPI), with llama-cpp-python's signatures, and
    answer what the GIL-releasing bindings answer; the first read after a decode still lets
    go of it."""
    model, context = stepped[0], stepped[1]
    pythonapi = ctypes._FUNCFLAG_PYTHONAPI  # type: ignore[attr-defined]
    held = [
        llama_api._token_to_piece,
        llama_api._vocab_is_eog,
        llama_api._vocab_get_attr,
        llama_api._sampler_accept,
        llama_api._sampler_apply,
        llama_api._get_logits_ith,
        llama_api._get_sampled_token_ith,
    ]
    for function in held:
        assert function._flags_ & pythonapi, function.__name__
        released = getattr(C, function.__name__)
        assert not released._flags_ & pythonapi
        assert (function.argtypes, function.restype) == (released.argtypes, released.restype)
    for token in [0, 1, 2, model.eos, 1000, model.n_vocab - 1]:
        assert model.token_attr(token) == C.llama_vocab_get_attr(model.vocab, token)
        assert model.is_eog(token) == C.llama_vocab_is_eog(model.vocab, token)
    buffer = ctypes.create_string_buffer(64)
    n = C.llama_token_to_piece(model.vocab, 1000, buffer, 64, 0, True)
    assert model.piece(1000, special=True) == buffer.raw[:n]
    row = C.llama_get_logits_ith(context.ptr, 1)
    assert np.array_equal(context.logits(1), np.ctypeslib.as_array(row, (model.n_vocab,)))


def test_samplers_sampled_together_pick_what_each_picks_alone(stepped: Decoded) -> None:
    """Many samplers over one step's rows, in blocks and groups of mixed chains (several of
    them sharing each row), against llama.cpp's full-vocabulary path."""
    # Mixed chains, rows out of order and repeated; then one chain on every row in order,
    # which reads the step's rows in place as one block.
    n = len(PROMPTS)
    mixed = [(replace(BASE, seed=i, **c), i % n) for i, c in enumerate(CHAINS * 3)]  # type: ignore[arg-type]
    biased = replace(BASE, logit_bias={10: 2.0, 5000: 30.0})
    _assert_same_tokens(stepped, mixed, together=True)
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        _assert_same_tokens(stepped, mixed, together=True, pool=pool)
    _assert_same_tokens(
        stepped, [(replace(biased, seed=100 + s), s) for s in range(n)], together=True
    )


def _bitmask(allowed: np.ndarray[Any, np.dtype[np.bool_]]) -> np.ndarray[Any, np.dtype[np.int32]]:
    """llguidance's layout: bit t % 32 of word t // 32."""
    padded = np.zeros((allowed.size + 31) // 32 * 32, np.uint8)
    padded[: allowed.size] = allowed
    return np.packbits(padded, bitorder="little").view(np.int32)


def test_a_masked_row_picks_what_the_chain_picks_among_every_allowed_token(
    decoded: Decoded,
) -> None:
    """Masks of every size: most tokens (inside a JSON string), a few (structure), and all but
    the row's best (so the unconstrained shortlist holds too few allowed tokens); rows sampled
    alone and in blocks, on one thread and on two."""
    model, context, prompts, rows = decoded
    rng = np.random.default_rng(0)
    logits = context.logits(rows[0])
    masks = {
        "half": rng.random(model.n_vocab) < 0.5,
        "thirty": np.isin(np.arange(model.n_vocab), rng.choice(model.n_vocab, 30)),
        "not-the-best": logits < np.sort(logits)[-5000],
    }
    ids_of = {}
    for name, allowed in masks.items():
        allowed[[10, 5000]] = True  # the biased tokens of one chain
        ids_of[name] = np.flatnonzero(allowed)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        for (name, allowed), changes in itertools.product(masks.items(), CHAINS):
            mask = _bitmask(allowed)
            ids = ids_of[name]
            configs = [replace(BASE, seed=seq, **changes) for seq in range(len(PROMPTS))]
            ours = [Sampler(model, config) for config in configs]
            references = [Sampler(model, config) for config in configs]
            try:
                for seq in range(len(PROMPTS)):
                    ours[seq].accept_prompt(prompts[seq])
                    references[seq].accept_prompt(prompts[seq])
                for draw in range(4):
                    expected = []
                    for seq, reference in enumerate(references):
                        candidates = np.empty(ids.size, _TOKEN_DATA)
                        candidates["id"] = ids
                        candidates["logit"] = context.logits(rows[seq])[ids]
                        candidates["p"] = 0.0
                        expected.append(reference._pick_from(candidates))
                    work = list(zip(ours, rows, strict=True))
                    if draw % 2:
                        tokens = [sampler.sample(context, row, mask) for sampler, row in work]
                    else:
                        tokens = Sampler.sample_many(
                            context, work, pool if draw == 2 else None, [mask] * len(work)
                        )
                    assert tokens == expected, (name, changes, draw)
                    assert allowed[tokens].all()
            finally:
                for sampler in ours + references:
                    sampler.close()


def test_masked_rows_beside_free_rows_leave_them_unchanged(stepped: Decoded) -> None:
    model, context, _, rows = stepped
    allowed = np.zeros(model.n_vocab, bool)
    allowed[100:200] = True
    mask = _bitmask(allowed)
    free = [Sampler(model, replace(BASE, seed=s)) for s in range(len(rows))]
    twins = [Sampler(model, replace(BASE, seed=s)) for s in range(len(rows))]
    masked = Sampler(model, BASE)
    try:
        alone = Sampler.sample_many(context, list(zip(free, rows, strict=True)))
        work = [*zip(twins, rows, strict=True), (masked, rows[1])]
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            together = Sampler.sample_many(context, work, pool, [None] * len(rows) + [mask])
        assert together[:-1] == alone
        assert 100 <= together[-1] < 200
        nothing = _bitmask(np.zeros(model.n_vocab, bool))
        assert Sampler.sample_many(context, [(masked, rows[0])], masks=[nothing]) == [-1]
    finally:
        for sampler in [*free, *twins, masked]:
            sampler.close()
