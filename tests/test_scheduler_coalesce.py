"""A consumer that falls behind gets the tokens waiting for it as one delta per choice, not one
message per token; the text is the same as a consumer that keeps up reads. Within a stream
interval the decode thread itself holds a stream's tokens back and hands them over together,
and a failure takes what it holds with it."""

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
    End,
    Event,
    Finish,
    Scheduler,
    SchedulerConfig,
    SchedulerMetrics,
    SeqRequest,
    coalesce,
)
from slm.errors import ResourceExhausted

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


@asynccontextmanager
async def open_scheduler(model: Model, stream_interval_s: float) -> AsyncIterator[Scheduler]:
    context = Context(model, ContextParams(n_seq=SLOTS, n_ctx_per_seq=256, n_batch=256))
    scheduler = Scheduler(
        SchedulerConfig(
            "gemma", SLOTS, 8, 64, 256, sample_threads=1, stream_interval_s=stream_interval_s
        ),
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


@pytest.fixture(scope="module")
async def scheduler(model: Model) -> AsyncIterator[Scheduler]:
    async with open_scheduler(model, stream_interval_s=0.0) as scheduler:
        yield scheduler


class RecordingQueue(asyncio.Queue[list[Event] | BaseException]):
    """A request's queue that keeps what the decode thread handed over, a put each."""

    def __init__(self) -> None:
        super().__init__()
        self.puts: list[list[Event] | BaseException] = []

    def put_nowait(self, item: list[Event] | BaseException) -> None:
        self.puts.append(item)
        super().put_nowait(item)


def request(model: Model, max_tokens: int = 16) -> SeqRequest:
    return SeqRequest(
        prompt=model.tokenize("The lighthouse keeper", add_special=True),
        sampling=Sampling(
            max_tokens=max_tokens, temperature=0.8, seed=7, logit_bias={1: -100, 106: -100}
        ),
        queue=RecordingQueue(),
    )


def text_of(events: list[Event]) -> str:
    return "".join(e.text for e in events if isinstance(e, Delta))


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


async def test_tokens_within_the_stream_interval_leave_together(
    model: Model, scheduler: Scheduler
) -> None:
    alone = request(model)
    every_step = [event async for event in scheduler.generate(alone)]
    assert isinstance(alone.queue, RecordingQueue)
    # Without an interval a message a step: 16 tokens (a piece of a character may wait for
    # the rest of it, so a step may have nothing to send).
    assert len(alone.queue.puts) > 8

    async with open_scheduler(model, stream_interval_s=3600.0) as held:
        together = request(model)
        events = [event async for event in held.generate(together)]
    assert isinstance(together.queue, RecordingQueue)
    # The first token at once; the other 15 wait for the interval, which outlasts the stream,
    # and leave with its end.
    first, rest = together.queue.puts
    assert isinstance(first, list)
    assert [type(e) for e in first] == [Delta]
    assert isinstance(rest, list)
    assert isinstance(rest[-1], End)
    assert len(rest) > 8
    assert text_of(events) == text_of(every_step)
    assert events[-1] == every_step[-1]


async def test_a_failure_takes_the_held_tokens_with_it(model: Model, scheduler: Scheduler) -> None:
    alone = [event async for event in scheduler.generate(request(model, max_tokens=64))]

    async with open_scheduler(model, stream_interval_s=3600.0) as held:
        failing = request(model, max_tokens=200)
        stream = held.generate(failing)
        received = [await anext(stream)]
        # Tokens wait in the decode thread; unloading the model fails the stream.
        await until(lambda: len(held._held.get(failing, ())) >= 8)
        await asyncio.to_thread(held.close)
        received.append(await anext(stream))
        with pytest.raises(ResourceExhausted):
            await anext(stream)
    # Nothing sampled was lost: the held tokens came before the failure.
    text = text_of(received)
    assert len(text) > len(text_of(received[:1]))
    assert text_of(alone).startswith(text)


def posting(step_s: float, interval_s: float) -> Scheduler:
    """A scheduler's event hand-off alone (no model, no thread), its steps taking step_s."""
    scheduler = Scheduler.__new__(Scheduler)
    scheduler.config = SchedulerConfig("gemma", SLOTS, 8, 64, 256, stream_interval_s=interval_s)
    scheduler._outgoing, scheduler._held, scheduler._active = [], {}, []
    scheduler._step_s = step_s
    return scheduler


@pytest.mark.parametrize(("step_s", "messages"), [(0.01, 2), (120.0, 3)])
def test_only_steps_shorter_than_the_interval_hold_tokens(step_s: float, messages: int) -> None:
    scheduler = posting(step_s, interval_s=60.0)
    stream = SeqRequest(prompt=[1], sampling=Sampling())
    steps: list[list[Event]] = [[Delta("a")], [Delta("b")], [Delta("c"), end(0)]]
    for events in steps:
        scheduler._post([(stream, events)])
    sent = [events for _, events in scheduler._outgoing if isinstance(events, list)]
    # Steps of 10 ms: the first token, then the rest with the end. Steps of two minutes: a
    # message a step, as holding would only delay each token by a step.
    assert len(sent) == messages
    assert [e for events in sent for e in events] == [Delta("a"), Delta("b"), Delta("c"), end(0)]
