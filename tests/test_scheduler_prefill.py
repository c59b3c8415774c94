"""Prompts that arrive together are read in one llama_decode, as llama-server reads them,
unless the replica is batch-invariant (then each prompt's chunk is read alone); either way each
sequence's first token comes from its own prompt's row."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from helpers import until

from inference_local.llama_api import Context, ContextParams, Model
from inference_local.sampling import Sampling, TokenLogprob
from inference_local.scheduler import (
    Delta,
    Scheduler,
    SchedulerConfig,
    SchedulerMetrics,
    SeqRequest,
)

PROMPTS = [
    "The lighthouse keeper",
    "Once upon a time, in a small village by the sea,",
    "def fibonacci(n):",
    "The three largest cities of France are",
]


@pytest.fixture(scope="module")
def model(model_path: Path) -> Iterator[Model]:
    model = Model(model_path, repack=True)
    yield model
    model.close()


@asynccontextmanager
async def open_scheduler(model: Model, batch_prompts: bool) -> AsyncIterator[Scheduler]:
    slots = len(PROMPTS)
    context = Context(model, ContextParams(n_seq=slots, n_ctx_per_seq=256, n_batch=256))
    scheduler = Scheduler(
        SchedulerConfig("gemma", slots, 8, 64, 256, batch_prompts=batch_prompts),
        model,
        context,
        SchedulerMetrics(),
        asyncio.get_running_loop(),
    )
    try:
        yield scheduler
    finally:
        await asyncio.to_thread(scheduler.close)
        context.close()


def request(model: Model, prompt: str) -> SeqRequest:
    return SeqRequest(
        prompt=model.tokenize(prompt, add_special=True),
        sampling=Sampling(max_tokens=1, temperature=0.0, logprobs=True, top_logprobs=3),
    )


async def first_token(scheduler: Scheduler, request: SeqRequest) -> TokenLogprob:
    [logprob] = [
        lp
        async for event in scheduler.generate(request)
        if isinstance(event, Delta)
        for lp in event.logprobs
    ]
    return logprob


async def together(scheduler: Scheduler, requests: list[SeqRequest]) -> list[TokenLogprob]:
    """Queue every request before the decode thread admits any: this thread holds the
    scheduler's lock (re-entrant, so the generators on this thread queue under it) until all
    of them wait."""
    with scheduler._cond:
        tasks = [asyncio.create_task(first_token(scheduler, r)) for r in requests]
        await until(lambda: scheduler.busy == len(requests))
    return await asyncio.gather(*tasks)


@pytest.mark.parametrize(("batch_prompts", "passes"), [(True, 1), (False, len(PROMPTS))])
async def test_prompts_that_arrive_together(model: Model, batch_prompts: bool, passes: int) -> None:
    async with open_scheduler(model, batch_prompts) as scheduler:
        alone = [await first_token(scheduler, request(model, p)) for p in PROMPTS]
        before = scheduler.prompt_passes
        batched = await together(scheduler, [request(model, p) for p in PROMPTS])
        assert scheduler.prompt_passes - before == passes
    assert len({lp.token for lp in alone}) > 1  # the prompts ask for different tokens
    for one, other in zip(alone, batched, strict=True):
        assert_same_row(one, other)


# How far a log-probability moves when its prompt is read in another batch shape. On a CPU
# whose matrix kernels depend on the batch's size it is not just rounding: on this machine's
# AVX-512/AMX Xeon the four prompts read together moved their candidates by up to 0.34 nats
# (0.05 on the machines before it).
BATCH_SHAPE_NATS = 0.5


def assert_same_row(ours: TokenLogprob, theirs: TokenLogprob) -> None:
    """`theirs` was sampled from the same prompt's row as `ours`: the same top candidates with
    the same log-probabilities, up to BATCH_SHAPE_NATS. Candidates that close may trade places,
    so a near-tie may even change the greedy choice, and a candidate at the bottom of one list
    may fall just outside the other. Another prompt's row fails: each prompt's best candidate
    is more than that above the others' lists."""
    assert theirs.token == theirs.top[0].token  # greedy: the best candidate is the choice
    assert len(theirs.top) == len(ours.top)
    mine = {t.token: t.logprob for t in ours.top}
    other = {t.token: t.logprob for t in theirs.top}
    for a, b in ((mine, other), (other, mine)):
        floor = min(b.values())
        for token, logprob in a.items():
            if token in b:
                assert b[token] == pytest.approx(logprob, abs=BATCH_SHAPE_NATS), token
            else:
                assert logprob <= floor + BATCH_SHAPE_NATS, token
