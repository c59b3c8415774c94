"""Continuous batching and sampling features of the engine, on the real default model."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from helpers import DEFAULT_MODEL
from prometheus_client import CollectorRegistry

from inference_local.config import InferenceLocalConfig, ModelConfig
from inference_local.engine import Delta, End, Engine, Event, Request
from inference_local.sampling import Sampling
from slm.errors import InvalidArgument, ResourceExhausted
from slm.server import GrpcService

PROMPT = "Once upon a time, in a small village by the sea,"
DEFAULT_MODEL_FILE = "gemma-3-270m-q4_k_m.gguf"


@pytest.fixture
def engine(inference_server: GrpcService) -> Engine:
    return inference_server.app.engine  # type: ignore[attr-defined,no-any-return]


@pytest.fixture(scope="module")
async def invariant_engine(model_path: object) -> AsyncIterator[Engine]:
    """A batch-invariant replica on two threads: flash attention is off and the weights keep
    the plain layout, so a sequence's text does not depend on the batch around it."""
    config = InferenceLocalConfig(
        models=[
            ModelConfig(
                name=DEFAULT_MODEL, path=DEFAULT_MODEL_FILE, parallel=4, context_length=1024
            )
        ],
        batch_invariant=True,
        n_threads=2,
        keep_alive_s=0,
    )
    engine = Engine(config, CollectorRegistry())
    await engine.start()
    yield engine
    await engine.close()


async def collect(engine: Engine, request: Request) -> tuple[str, End, list[Delta]]:
    events: list[Event] = [e async for e in engine.generate(request)]
    deltas = [e for e in events if isinstance(e, Delta)]
    end = events[-1]
    assert isinstance(end, End)
    return "".join(d.text for d in deltas), end, deltas


def sampled(seed: int, **kw: object) -> Request:
    sampling = Sampling(max_tokens=24, temperature=0.8, seed=seed, **kw)  # type: ignore[arg-type]
    return Request(DEFAULT_MODEL, sampling, prompt=PROMPT)


def _value(metric: object, *labels: str) -> float:
    return float(metric.labels(*labels)._value.get())  # type: ignore[attr-defined]


def _hist(metric: object, label: str) -> tuple[float, float]:
    """(sum, count) of a labelled histogram."""
    child = metric.labels(label)  # type: ignore[attr-defined]
    samples = {s.name: s.value for s in child._samples()}
    return samples["_sum"], samples["_count"]


async def test_same_seed_same_text_alone_or_batched(invariant_engine: Engine) -> None:
    engine = invariant_engine
    alone, _, _ = await collect(engine, sampled(11))
    steps_before = _hist(engine.metrics.batch_tokens, DEFAULT_MODEL)[1]
    tokens_before = _value(engine.metrics.tokens, DEFAULT_MODEL)
    results = await asyncio.gather(*(collect(engine, sampled(s)) for s in (11, 12, 13, 14)))
    assert results[0][0] == alone
    assert len({r[0] for r in results}) > 1
    steps = _hist(engine.metrics.batch_tokens, DEFAULT_MODEL)[1] - steps_before
    tokens = _value(engine.metrics.tokens, DEFAULT_MODEL) - tokens_before
    # Four streams were decoded together: far fewer steps than sampled tokens.
    assert steps < tokens * 0.6, (steps, tokens)


async def test_logprobs_and_top_logprobs(engine: Engine) -> None:
    request = Request(
        DEFAULT_MODEL,
        Sampling(max_tokens=5, temperature=0, logprobs=True, top_logprobs=3),
        prompt=PROMPT,
    )
    _, end, deltas = await collect(engine, request)
    logprobs = [lp for d in deltas for lp in d.logprobs]
    assert len(logprobs) == end.completion_tokens
    for lp in logprobs:
        assert lp.logprob <= 0
        assert len(lp.top) == 3
        # Greedy decoding picks the most likely token.
        assert lp.top[0].token == lp.token
        assert lp.top[0].logprob == pytest.approx(lp.logprob)
        assert lp.top[0].logprob >= lp.top[1].logprob >= lp.top[2].logprob


async def test_logit_bias_bans_and_forces_tokens(engine: Engine) -> None:
    greedy = Sampling(max_tokens=3, temperature=0)
    base, _, _ = await collect(engine, Request(DEFAULT_MODEL, greedy, prompt=PROMPT))
    first = (await engine.tokenize(DEFAULT_MODEL, base, add_special=False))[0]
    banned = Sampling(max_tokens=3, temperature=0, logit_bias={first: -100.0})
    text, _, _ = await collect(engine, Request(DEFAULT_MODEL, banned, prompt=PROMPT))
    assert (await engine.tokenize(DEFAULT_MODEL, text, add_special=False))[0] != first
    forced_token = (await engine.tokenize(DEFAULT_MODEL, " zebra", add_special=False))[0]
    forced = Sampling(max_tokens=1, temperature=0, logit_bias={forced_token: 100.0})
    text, _, _ = await collect(engine, Request(DEFAULT_MODEL, forced, prompt=PROMPT))
    assert text == await engine.detokenize(DEFAULT_MODEL, [forced_token])


async def test_penalties_change_sampling_and_bad_values_are_refused(engine: Engine) -> None:
    plain, _, _ = await collect(
        engine,
        Request(
            DEFAULT_MODEL, Sampling(max_tokens=40, temperature=0), prompt="one one one one one one"
        ),
    )
    penalised, _, _ = await collect(
        engine,
        Request(
            DEFAULT_MODEL,
            Sampling(max_tokens=40, temperature=0, repetition_penalty=1.8, frequency_penalty=1.0),
            prompt="one one one one one one",
        ),
    )
    assert plain != penalised
    with pytest.raises(InvalidArgument, match="presence_penalty"):
        await collect(engine, sampled(1, presence_penalty=3.0))
    with pytest.raises(InvalidArgument, match="logit_bias"):
        await collect(engine, sampled(1, logit_bias={10**9: 1.0}))


async def test_tokenize_detokenize_round_trip(engine: Engine) -> None:
    tokens = await engine.tokenize(DEFAULT_MODEL, "Hello, wörld!", add_special=False)
    assert tokens
    assert await engine.detokenize(DEFAULT_MODEL, tokens) == "Hello, wörld!"
    with pytest.raises(InvalidArgument, match="outside the vocabulary"):
        await engine.detokenize(DEFAULT_MODEL, [-1])


async def drain(stream: AsyncIterator[Event]) -> None:
    async for _ in stream:
        pass


async def test_full_queue_is_refused_at_once(model_path: object) -> None:
    config = InferenceLocalConfig(
        models=[
            ModelConfig(name="one-slot", path=DEFAULT_MODEL_FILE, parallel=1, context_length=512)
        ],
        max_queue=1,
        keep_alive_s=0,
    )
    engine = Engine(config, CollectorRegistry())
    await engine.start()
    try:
        long = Request(
            "one-slot", Sampling(max_tokens=400, temperature=1.0, seed=1), prompt="Count: one, two,"
        )
        running = engine.generate(long)
        assert isinstance(await anext(running), Delta)  # it holds the only slot now
        waiting = asyncio.create_task(drain(engine.generate(long)))
        # One turn of the loop runs the task up to its first suspension: by then it is queued.
        await asyncio.sleep(0)
        with pytest.raises(ResourceExhausted, match="queue limit 1"):
            await drain(engine.generate(long))
        await running.aclose()  # type: ignore[attr-defined]
        waiting.cancel()
    finally:
        await engine.close()


def _contract(topic: int, clauses: int = 30) -> str:
    text = " ".join(
        f"Clause {i}: the {topic}th tenant pays {i * 7 + topic} euros on day {i % 28 + 1}."
        for i in range(1, clauses + 1)
    )
    return f"Read this contract.\n{text}\nQuestion: what is paid under clause 3? Answer:"


async def test_long_prompts_same_text_alone_or_batched_while_slots_move(
    invariant_engine: Engine,
) -> None:
    """Prompts longer than a prefill chunk, batched with a stream that ends early: the slot it
    frees makes the engine move a running sequence down, and every text still equals the text
    of the same request run alone."""
    engine = invariant_engine

    def long(i: int) -> Request:
        sampling = Sampling(max_tokens=16, temperature=0.8, seed=100 + i)
        return Request(DEFAULT_MODEL, sampling, prompt=_contract(i))

    # More than a chunk, so a prompt is read in several passes.
    chunk = engine.config.prefill_chunk
    assert len(await engine.tokenize(DEFAULT_MODEL, _contract(0), True)) > chunk + 64
    alone = [(await collect(engine, long(i)))[0] for i in range(3)]
    short = Request(DEFAULT_MODEL, Sampling(max_tokens=2, temperature=0.0), prompt="Hello")
    moves_before = _value(engine.metrics.moves, DEFAULT_MODEL)
    batched = await asyncio.gather(
        collect(engine, short), *(collect(engine, long(i)) for i in range(3))
    )
    assert [text for text, _, _ in batched[1:]] == alone
    assert len(set(alone)) == 3
    assert _value(engine.metrics.moves, DEFAULT_MODEL) > moves_before


def _steps_over(engine: Engine, model: str, tokens: int) -> float:
    """How many scheduler steps so far computed more than `tokens` tokens."""
    child = engine.metrics.batch_tokens.labels(model)
    samples = child._samples()
    total = next(s.value for s in samples if s.name == "_count")
    within = next(
        s.value for s in samples if s.name == "_bucket" and float(s.labels["le"]) == tokens
    )
    return float(total - within)


async def test_a_burst_of_prompts_is_read_a_chunk_a_step_while_a_stream_runs(
    model_path: object,
) -> None:
    """Prompts arriving together while a stream runs are read one chunk's worth per step, with a
    decode of the running stream between them, so it never waits for the whole burst."""
    config = InferenceLocalConfig(
        models=[ModelConfig(name="four", path=DEFAULT_MODEL_FILE, parallel=4, context_length=512)],
        prefill_chunk=128,
        keep_alive_s=0,
    )
    engine = Engine(config, CollectorRegistry())
    await engine.start()
    try:
        # Each prompt fits in a chunk, two do not: a step reading two computes over 128 tokens.
        size = len(await engine.tokenize("four", _contract(0, clauses=5), True))
        assert 64 < size <= 128
        no_eos = {1: -100.0, 106: -100.0}
        stream = engine.generate(
            Request(
                "four",
                Sampling(max_tokens=300, temperature=1.0, seed=1, logit_bias=no_eos),
                prompt="Count: one, two,",
            )
        )
        assert isinstance(await anext(stream), Delta)  # it is decoding now
        before = _steps_over(engine, "four", 128)
        burst = [
            Request("four", Sampling(max_tokens=2, temperature=0.0), prompt=_contract(i, 5))
            for i in range(3)
        ]
        answers = await asyncio.gather(*(collect(engine, r) for r in burst))
        assert all(end.completion_tokens == 2 for _, end, _ in answers)
        assert _steps_over(engine, "four", 128) == before
        # The stream ran through the burst and is still running.
        assert isinstance(await anext(stream), Delta)
        await stream.aclose()  # type: ignore[attr-defined]
    finally:
        await engine.close()


@pytest.mark.parametrize(
    ("invariant", "repacked", "flash_attention"),
    [(False, True, "llama.cpp's choice"), (True, False, "off")],
)
async def test_defaults_are_llama_servers_and_batch_invariance_is_asked_for(
    model_path: object,
    caplog: pytest.LogCaptureFixture,
    invariant: bool,
    repacked: bool,
    flash_attention: str,
) -> None:
    """By default a model loads as llama-server loads it (repacked weights, flash attention as
    llama.cpp chooses); batch_invariant gives both up on a CPU with several threads. The load
    log says which."""
    config = InferenceLocalConfig(
        models=[ModelConfig(name="m", path=DEFAULT_MODEL_FILE, parallel=1, context_length=256)],
        batch_invariant=invariant,
        n_threads=2,
    )
    engine = Engine(config, CollectorRegistry())
    with caplog.at_level("INFO", logger="inference_local.engine"):
        await engine.start()
    try:
        [loaded] = [r for r in caplog.records if r.getMessage() == "model loaded"]
        assert loaded.batch_invariant is invariant  # type: ignore[attr-defined]
        assert loaded.repacked is repacked  # type: ignore[attr-defined]
        assert loaded.flash_attention == flash_attention  # type: ignore[attr-defined]
        text, end, _ = await collect(engine, Request("m", Sampling(max_tokens=4), prompt=PROMPT))
        assert end.completion_tokens == 4
        assert text
    finally:
        await engine.close()
