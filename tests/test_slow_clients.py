"""Slow and vanished clients: a reader that stops never stalls the batch or other streams, holds
its slot only up to a configured bound, and what is kept for it stays bounded."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest
from prometheus_client import CollectorRegistry

from inference_local.config import InferenceLocalConfig, ModelConfig
from inference_local.engine import Delta, End, Engine, Event, Finish, Request
from inference_local.sampling import Sampling
from slm.errors import DeadlineExceeded

MODEL_FILE = "gemma-3-270m-q4_k_m.gguf"
# End-of-generation banned: a stream runs to max_tokens, however the model would end it.
NO_EOS = {1: -100.0, 106: -100.0}


def long_request(model: str, max_tokens: int, seed: int) -> Request:
    sampling = Sampling(max_tokens=max_tokens, temperature=0.8, seed=seed, logit_bias=NO_EOS)
    return Request(model, sampling, prompt="Write a long story about a lighthouse keeper.")


async def until(condition: Callable[[], bool], timeout_s: float = 120) -> None:
    """Poll a condition the decode thread makes true (it has no event to wait on)."""
    async with asyncio.timeout(timeout_s):
        while not condition():  # noqa: ASYNC110
            await asyncio.sleep(0.02)


def count(engine: Engine, model: str, reason: str) -> float:
    return float(engine.metrics.requests.labels(model, reason)._value.get())


def running(engine: Engine, model: str) -> float:
    return float(engine.metrics.running.labels(model)._value.get())


async def read_all(stream: AsyncIterator[Event]) -> list[Event]:
    return [event async for event in stream]


@pytest.fixture
async def engine(model_path: object) -> AsyncIterator[Engine]:
    # Small bounds: a reader is stalled after 0.5 s of untaken output or 24 untaken steps.
    config = InferenceLocalConfig(
        models=[ModelConfig(name="two", path=MODEL_FILE, parallel=2, context_length=1024)],
        keep_alive_s=0,
        stall_timeout_s=0.5,
        max_undelivered_steps=24,
    )
    engine = Engine(config, CollectorRegistry())
    await engine.start()
    try:
        yield engine
    finally:
        await engine.close()


async def test_a_reader_that_stops_frees_its_slot_and_others_complete(engine: Engine) -> None:
    stalled = engine.generate(long_request("two", 900, seed=1))
    assert isinstance(await anext(stalled), Delta)  # it runs; its reader takes nothing more
    # Another stream shares the batch and runs to its end while the first one's reader stalls.
    other = await read_all(engine.generate(long_request("two", 120, seed=2)))
    end = other[-1]
    assert isinstance(end, End)
    assert (end.finish, end.completion_tokens) == (Finish.LENGTH, 120)
    await until(lambda: count(engine, "two", "stalled") == 1)
    await until(lambda: running(engine, "two") == 0)
    # Both slots are free again: two new streams run at once.
    both = await asyncio.gather(
        *(read_all(engine.generate(long_request("two", 8, seed=s))) for s in (3, 4))
    )
    assert all(isinstance(events[-1], End) for events in both)
    # The reader, back, gets what was kept for it, then why the stream stopped; never an End.
    kept: list[Event] = []

    async def come_back() -> None:
        async for event in stalled:
            kept.append(event)

    with pytest.raises(DeadlineExceeded) as raised:
        await come_back()
    assert raised.value.reason == "READER_STALLED"
    assert not any(isinstance(event, End) for event in kept)


async def test_output_kept_for_a_stalled_reader_is_bounded(model_path: object) -> None:
    # A stall timeout the test never reaches: only the limit on untaken output stops it.
    config = InferenceLocalConfig(
        models=[ModelConfig(name="one", path=MODEL_FILE, parallel=1, context_length=1024)],
        keep_alive_s=0,
        stall_timeout_s=3600,
        max_undelivered_steps=16,
    )
    engine = Engine(config, CollectorRegistry())
    await engine.start()
    try:
        stalled = engine.generate(long_request("one", 900, seed=5))
        assert isinstance(await anext(stalled), Delta)
        await until(lambda: count(engine, "one", "stalled") == 1)
        await until(lambda: running(engine, "one") == 0)
        with pytest.raises(DeadlineExceeded, match="left 16 steps of output untaken"):
            await read_all(stalled)
        # The slot serves the next request.
        events = await read_all(engine.generate(long_request("one", 8, seed=6)))
        assert isinstance(events[-1], End)
        assert events[-1].completion_tokens == 8
    finally:
        await engine.close()


async def test_a_slow_reader_that_keeps_up_is_not_stopped(engine: Engine) -> None:
    """A reader slower than the engine but never leaving output untaken for the stall bound
    (each take empties its queue) completes: only output waiting counts, not the stream's age."""
    stream = engine.generate(long_request("two", 60, seed=7))
    events: list[Event] = []
    async for event in stream:
        events.append(event)
        # Slower than a decode step, well inside the 0.5 s bound.
        await asyncio.sleep(0.05)
    assert isinstance(events[-1], End)
    assert events[-1].completion_tokens == 60
    assert count(engine, "two", "stalled") == 0
