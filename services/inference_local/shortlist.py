"""The tight shortlist of a block of logit rows, compiled: one call that lets go of the GIL.

`Sampler._shortlists` in numpy made some twenty array calls a block; each let go of the GIL for
its loop and waited to take it back, and several (the fancy indexing, the partition) held it
throughout. On an H100 at 64 streams that function held inference-local's GIL in 31% of the
samples that were not the load's (bench/results/gpu_gil_2026-12-07-h100.md). Compiled by numba
with `nogil=True`, a block is one call without the GIL, so the other contexts' threads and the
event loop run Python meanwhile. numba caches the machine code in the first writable place of
$NUMBA_CACHE_DIR, beside this file, and the user's cache directory (in the images, whose user
cannot write the installed package, /tmp/.cache/numba: the chart's /tmp volume): `warm`, at
the first model load, compiles it there once (3.6 s on a 2-core machine) and reads it back
after that (0.2 s). Where none is writable it compiles at every start instead.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numba
import numpy as np
import numpy.typing as npt


def _njit(function: Callable[..., Any]) -> Any:
    """numba.njit without the GIL, cached where numba finds a writable place; numba refuses
    cache=True (RuntimeError) where it finds none, and the kernel is then compiled per process."""
    try:
        return numba.njit(nogil=True, cache=True, boundscheck=False)(function)
    except RuntimeError:
        return numba.njit(nogil=True, cache=False, boundscheck=False)(function)


@_njit
def _kth_largest(values: npt.NDArray[np.float32], k: int) -> float:
    """The k-th largest of `values`, from a min-heap of the k best (the chains that take this
    path keep at most n_vocab / 200 tokens, and most keep 1 or 40)."""
    heap = np.empty(k, np.float32)
    n = 0
    for v in values:
        if n < k:
            i = n
            n += 1
            while i > 0:
                parent = (i - 1) >> 1
                if heap[parent] <= v:
                    break
                heap[i] = heap[parent]
                i = parent
            heap[i] = v
        elif v > heap[0]:
            i = 0
            while True:
                child = 2 * i + 1
                if child >= k:
                    break
                if child + 1 < k and heap[child + 1] < heap[child]:
                    child += 1
                if heap[child] >= v:
                    break
                heap[i] = heap[child]
                i = child
            heap[i] = v
    return float(heap[0])


@_njit
def _compiled(rows, keep, slices, moved_rows, moved_ids):  # type: ignore[no-untyped-def]
    """`shortlists` with its result as (ids, logits, ends, ok); ok False for None."""
    n_rows, n_vocab = rows.shape
    width = n_vocab // slices
    best = np.empty((n_rows, width), np.float32)
    thresholds = np.empty(n_rows, np.float32)
    room = moved_ids.size
    for r in range(n_rows):
        row = rows[r]
        group = best[r]
        group[:] = row[:width]
        nan = False
        for g in range(width):
            nan |= group[g] != group[g]
        for s in range(1, slices):
            part = row[s * width : (s + 1) * width]
            for g in range(width):
                group[g] = max(group[g], part[g])
                nan |= part[g] != part[g]
        threshold = np.nan
        if not nan:
            ranked = group.copy()
            for j in range(moved_ids.size):
                if moved_rows[j] == r:
                    ranked[moved_ids[j] % width] = -np.inf
            threshold = _kth_largest(ranked, keep)
        if not np.isfinite(threshold):  # NaN in the row, or no finite threshold
            return np.empty(0, np.int32), np.empty(0, np.float32), np.zeros(n_rows, np.int64), False
        thresholds[r] = threshold
        for g in range(width):
            if group[g] >= threshold:
                for s in range(slices):
                    if row[s * width + g] >= threshold:
                        room += 1
    ids = np.empty(room, np.int32)
    logits = np.empty(room, np.float32)
    ends = np.zeros(n_rows, np.int64)
    reread = np.empty(width, np.int64)  # a row's groups that reach its threshold
    count = 0
    for r in range(n_rows):
        row = rows[r]
        threshold = thresholds[r]
        group = best[r]
        n_reread = 0
        for g in range(width):
            if group[g] >= threshold:
                reread[n_reread] = g
                n_reread += 1
        start = count
        # Slice by slice, groups ascending: tokens (s * width + g) come in ascending order.
        for s in range(slices):
            for i in range(n_reread):
                token = s * width + reread[i]
                if row[token] >= threshold:
                    ids[count] = token
                    logits[count] = row[token]
                    count += 1
        for j in range(moved_ids.size):
            token = moved_ids[j]
            if moved_rows[j] != r or row[token] >= threshold:
                continue
            # Kept whatever its logit: inserted in token order, once (a token may repeat).
            at = count
            while at > start and ids[at - 1] > token:
                at -= 1
            if at > start and ids[at - 1] == token:
                continue
            ids[at + 1 : count + 1] = ids[at:count].copy()
            logits[at + 1 : count + 1] = logits[at:count].copy()
            ids[at] = token
            logits[at] = row[token]
            count += 1
        ends[r] = count
    return ids[:count], logits[:count], ends, True


def shortlists(
    rows: npt.NDArray[np.float32],
    keep: int,
    slices: int,
    moved_rows: npt.NDArray[np.int64],
    moved_ids: npt.NDArray[np.int64],
) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.float32], list[int]] | None:
    """Each row's candidates in token order, rows one after another (row i's end at ends[i]):
    every token whose logit reaches the row's threshold t, plus the tokens the row's chain
    moves (`moved_ids[j]` of row `moved_rows[j]`) whatever their logits. t is the keep-th best
    of the row's group maxima (token j in group j % (n_vocab / slices)) leaving out the groups
    that hold a moved token, so at least `keep` unmoved tokens reach it. None when a row holds
    NaN or its threshold is not finite. n_vocab must be a multiple of `slices`."""
    ids, logits, ends, ok = _compiled(
        np.ascontiguousarray(rows, np.float32),
        keep,
        slices,
        np.ascontiguousarray(moved_rows, np.int64),
        np.ascontiguousarray(moved_ids, np.int64),
    )
    if not ok:
        return None
    return ids, logits, ends.tolist()


def warm() -> None:
    """Compile the kernel for the types `shortlists` passes (or load it from the cache)."""
    shortlists(np.zeros((1, 64), np.float32), 1, 64, np.zeros(0, np.int64), np.zeros(0, np.int64))
