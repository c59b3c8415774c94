"""A consumer that falls behind gets the tokens waiting for it as one delta per choice, not one
message per token; the text is the same as a consumer that keeps up reads."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from helpers import until

from inference_local.llama_api import Context, ContextParams, Model
from inference_local.sampling import Sampling, TokenLogprob
from inference_local.scheduler import (
    Delta,
    End,
    Event,
    Finish,
    Scheduler,
    SchedulerConfig,
    SchedulerMetrics,
    SeqRequest,
    coalesce,
)

SLOTS = 2


def end(index: int) -> End:
    return End(Finish.LENGTH, 3, 2, "m", index)


def test_coalesce_merges_each_choices_deltas_up_to_its_end() -> None:
    first, second = TokenLogprob("a", -0.5, b"a", ()), TokenLogprob("b", -0.7, b"b", ())
    events: list[Event] = [
        Delta("a", (first,), 0),
        Delta("x", (), 1),
        Delta("b", (second,), 0),
        end(0),
        Delta("y", (), 1),
        end(1),
    ]
    assert coalesce(events) == [
        Delta("ab", (first, second), 0),
        Delta("xy", (), 1),
        end(0),
        end(1),
    ]
    # Nothing joins a delta across its choice's end.
    assert coalesce([Delta("a"), end(0), Delta("b")]) == [Delta("a"), end(0), Delta("b")]


@pytest.fixture(scope="module")
def model(model_path: Path) -> Iterator[Model]:
    model = Model(model_path)
    yield model
    model.close()


@pytest.fixture(scope="module")
async def scheduler(model: Model) -> AsyncIterator[Scheduler]:
    context = Context(model, ContextParams(n_seq=SLOTS, n_ctx_per_seq=256, n_batch=256))
    scheduler = Scheduler(
        SchedulerConfig("gemma", SLOTS, 8, 64, 256, sample_threads=1),
        model,
        context,
        SchedulerMetrics(),
        asyncio.get_running_loop(),
    )
    yield scheduler
    await asyncio.to_thread(scheduler.close)
    context.close()


def request(model: Model) -> SeqRequest:
    return SeqRequest(
        prompt=model.tokenize("The lighthouse keeper", add_special=True),
        sampling=Sampling(max_tokens=16, temperature=0.8, seed=7, logit_bias={1: -100, 106: -100}),
    )


async def test_a_consumer_that_falls_behind_reads_one_delta(
    model: Model, scheduler: Scheduler
) -> None:
    keeping_up = [event async for event in scheduler.generate(request(model))]

    behind = request(model)
    stream = scheduler.generate(behind)
    first = await anext(stream)
    # Read nothing more until the whole answer waits in the queue (the decode thread fills it;
    # nothing signals the loop but the queue itself, whose waiters this test must not be).
    await until(
        lambda: any(
            isinstance(item, list) and any(isinstance(e, End) for e in item)
            for item in list(behind.queue._queue)  # type: ignore[attr-defined]
        )
    )
    rest = [event async for event in stream]

    assert isinstance(first, Delta)
    assert [type(e) for e in rest] == [Delta, End]
    text = "".join(e.text for e in keeping_up if isinstance(e, Delta))
    assert first.text + rest[0].text == text  # type: ignore[union-attr]
    assert rest[1] == keeping_up[-1]
