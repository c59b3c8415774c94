"""The compiled shortlist kernel against its definition, on blocks with ties and moved tokens."""

from __future__ import annotations

from typing import Any

import numba
import numpy as np
import pytest

from inference_local import shortlist

N_VOCAB = 64 * 256  # width 256; a chain here keeps at most n_vocab / 200 tokens
SLICES = 64


def expected(
    rows: np.ndarray, keep: int, moved_rows: np.ndarray, moved_ids: np.ndarray
) -> tuple[list[int], list[float], list[int]]:
    """What `shortlist.shortlists` is defined to give, computed the slow way."""
    width = N_VOCAB // SLICES
    ids: list[int] = []
    logits: list[float] = []
    ends: list[int] = []
    for r, row in enumerate(rows):
        moved = {int(t) for t in moved_ids[moved_rows == r]}
        groups = row.reshape(SLICES, width).max(axis=0)
        ranked = groups.copy()
        for token in moved:
            ranked[token % width] = -np.inf
        threshold = np.sort(ranked)[-keep]
        kept = sorted({int(t) for t in np.flatnonzero(row >= threshold)} | moved)
        ids += kept
        logits += [float(row[t]) for t in kept]
        ends.append(len(ids))
    return ids, logits, ends


@pytest.mark.parametrize("keep", [1, 2, 40, 81])
def test_the_kernel_gives_every_token_at_the_threshold_and_every_moved_one(keep: int) -> None:
    rng = np.random.default_rng(keep)
    for trial in range(30):
        n_rows = int(rng.integers(1, 9))
        rows = rng.normal(size=(n_rows, N_VOCAB)).astype(np.float32)
        if trial % 3 == 0:  # coarse logits: many ties, within and across groups
            rows = (np.round(rows * 2) / 2).astype(np.float32)
        moved_rows = rng.integers(0, n_rows, int(rng.integers(0, 6)))
        moved_ids = rng.integers(0, N_VOCAB, moved_rows.size)
        if trial % 4 == 0:  # a token moved twice, the row's best moved, the last token
            best = int(np.argmax(rows[0]))
            moved_rows = np.concatenate((moved_rows, [0, 0, 0, 0]))
            moved_ids = np.concatenate((moved_ids, [5, 5, best, N_VOCAB - 1]))
        found = shortlist.shortlists(rows, keep, SLICES, moved_rows, moved_ids)
        assert found is not None
        ids, logits, ends = found
        want_ids, want_logits, want_ends = expected(rows, keep, moved_rows, moved_ids)
        assert ends == want_ends
        assert ids.tolist() == want_ids
        assert logits.tolist() == want_logits


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_a_row_holding_nan_or_without_a_finite_threshold_gives_none(bad: float) -> None:
    rows = np.zeros((3, N_VOCAB), np.float32)
    none = np.zeros(0, np.int64)
    if np.isnan(bad):
        rows[2, 1234] = bad  # anywhere in a row
        assert shortlist.shortlists(rows, 1, SLICES, none, none) is None
    else:
        rows[1, :] = bad  # every group's best infinite: so is the threshold
        assert shortlist.shortlists(rows, 1, SLICES, none, none) is None
    assert shortlist.shortlists(rows[:1], 1, SLICES, none, none) is not None


def test_the_kernel_runs_without_the_gil() -> None:
    """What the kernel is for: other threads run Python while a block is shortlisted."""
    assert shortlist._compiled.targetoptions["nogil"]
    assert shortlist._kth_largest.targetoptions["nogil"]


def test_where_numba_finds_nowhere_to_cache_the_kernel_compiles_uncached() -> None:
    """A function whose source file does not exist has no cache location at all, as a kernel
    in a read-only install with no writable cache directory would have: numba refuses
    cache=True for it, and `_njit` compiles it without a cache instead of failing the import."""
    namespace: dict[str, Any] = {}
    exec(compile("def add_one(x):\n    return x + 1\n", "<nowhere>", "exec"), namespace)
    with pytest.raises(RuntimeError, match="no locator"):
        numba.njit(cache=True)(namespace["add_one"])
    compiled = shortlist._njit(namespace["add_one"])
    assert compiled(41) == 42
    assert compiled.targetoptions["nogil"]
