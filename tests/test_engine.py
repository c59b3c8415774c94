"""The llama.cpp engine with the real default model: streaming, sampling, limits, cancellation."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from helpers import DEFAULT_MODEL

from inference_local.chat_template import Message
from inference_local.engine import Delta, End, Engine, Event, Finish, Request
from inference_local.sampling import Sampling
from slm.errors import InvalidArgument, NotFound
from slm.server import GrpcService

PROMPT = "The three primary colours are"


@pytest.fixture
def engine(inference_server: GrpcService) -> Engine:
    return inference_server.app.engine  # type: ignore[attr-defined,no-any-return]


async def run(engine: Engine, request: Request) -> tuple[str, End]:
    text: list[str] = []
    events: list[Event] = [e async for e in engine.generate(request)]
    ends = [e for e in events if isinstance(e, End)]
    assert len(ends) == 1
    assert events[-1] is ends[0]
    text = [e.text for e in events if isinstance(e, Delta)]
    return "".join(text), ends[0]


async def test_chat_streams_text_then_one_end_with_usage(engine: Engine) -> None:
    request = Request(
        DEFAULT_MODEL,
        Sampling(max_tokens=12, seed=3),
        messages=(Message("system", "Be brief."), Message("user", "Name a fruit.")),
    )
    text, end = await run(engine, request)
    assert text.strip()
    assert end.finish in (Finish.STOP, Finish.LENGTH)
    assert 0 < end.completion_tokens <= 12
    assert end.prompt_tokens > 5
    assert end.model == DEFAULT_MODEL


async def test_max_tokens_ends_with_length(engine: Engine) -> None:
    _, end = await run(
        engine, Request(DEFAULT_MODEL, Sampling(max_tokens=5, temperature=0), prompt=PROMPT)
    )
    assert (end.finish, end.completion_tokens) == (Finish.LENGTH, 5)


async def test_same_seed_same_text(engine: Engine) -> None:
    def request(seed: int) -> Request:
        return Request(
            DEFAULT_MODEL,
            Sampling(max_tokens=24, temperature=0.8, seed=seed),
            prompt="Once upon a time",
        )

    a, _ = await run(engine, request(42))
    b, _ = await run(engine, request(42))
    c, _ = await run(engine, request(7))
    assert a == b
    assert a != c


async def test_stop_string_ends_before_it_and_never_leaks(engine: Engine) -> None:
    greedy = Sampling(max_tokens=24, temperature=0)
    full, _ = await run(engine, Request(DEFAULT_MODEL, greedy, prompt=PROMPT))
    words = full.split()
    assert len(words) > 3, full
    stop = words[2]
    cut, end = await run(
        engine,
        Request(DEFAULT_MODEL, Sampling(max_tokens=24, temperature=0, stop=(stop,)), prompt=PROMPT),
    )
    assert end.finish == Finish.STOP
    assert stop not in cut
    assert full.startswith(cut)
    assert cut == full[: full.index(stop)]


async def test_prompt_longer_than_context_names_both_numbers(engine: Engine) -> None:
    request = Request(DEFAULT_MODEL, Sampling(max_tokens=4), prompt="hello " * 3000)
    with pytest.raises(InvalidArgument, match=r"prompt is \d+ tokens .* context of 2048 tokens"):
        await run(engine, request)


async def test_unknown_model_and_bad_sampling(engine: Engine) -> None:
    with pytest.raises(NotFound, match="no-such-model"):
        await run(engine, Request("no-such-model", Sampling(), prompt="hi"))
    with pytest.raises(InvalidArgument, match="temperature"):
        await run(engine, Request(DEFAULT_MODEL, Sampling(temperature=3.0), prompt="hi"))
    with pytest.raises(InvalidArgument, match="messages"):
        await run(engine, Request(DEFAULT_MODEL, Sampling(), messages=()))


def _sample(engine: Engine, name: str, **labels: str) -> float:
    metric = getattr(engine.metrics, name)
    return float(metric.labels(**labels)._value.get())


async def test_cancelled_generation_stops_decoding(engine: Engine) -> None:
    tokens_before = _sample(engine, "tokens", model=DEFAULT_MODEL)
    cancelled_before = engine.metrics.requests.labels(DEFAULT_MODEL, "cancelled")._value.get()
    stream: AsyncIterator[Event] = engine.generate(
        Request(
            DEFAULT_MODEL,
            Sampling(max_tokens=1500, temperature=1.0, seed=1),
            prompt="Count from one to one thousand: one, two,",
        )
    )
    deltas = 0
    async for event in stream:
        assert isinstance(event, Delta)
        deltas += 1
        if deltas == 3:
            break
    await stream.aclose()  # type: ignore[attr-defined]
    # The next generation can only start once the cancelled one has left the model.
    _, end = await run(engine, Request(DEFAULT_MODEL, Sampling(max_tokens=2), prompt="Hi"))
    generated = _sample(engine, "tokens", model=DEFAULT_MODEL) - tokens_before
    assert engine.metrics.requests.labels(DEFAULT_MODEL, "cancelled")._value.get() == (
        cancelled_before + 1
    )
    # Far fewer than the 1,500 asked for: decoding stopped within a token of the cancel.
    assert generated - end.completion_tokens < 10
