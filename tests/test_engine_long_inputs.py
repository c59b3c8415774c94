"""Long inputs are tokenised on a worker thread, so one request cannot stall every stream."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from test_models import FILE, make_engine

from inference_local import engine as engine_module
from inference_local.engine import Engine, LoadSpec, Request
from inference_local.llama_api import Model
from inference_local.sampling import Sampling
from slm.errors import InvalidArgument

LONG = "lorem ipsum dolor sit amet " * (engine_module.INLINE_INPUT_CHARS // 27 + 1)


@pytest.fixture
async def engine(model_path: Path, tmp_path: Path) -> AsyncIterator[Engine]:
    e = make_engine(tmp_path)
    await e.start()
    await e.load(LoadSpec("a", FILE, context_length=256))
    yield e
    await e.close()


def record_threads(monkeypatch: pytest.MonkeyPatch, model: Model) -> list[int]:
    """Patch `model.tokenize` to note the thread of every call."""
    threads: list[int] = []
    real = model.tokenize

    def tokenize(text: str, *, add_special: bool, parse_special: bool = True) -> list[int]:
        threads.append(threading.get_ident())
        return real(text, add_special=add_special, parse_special=parse_special)

    monkeypatch.setattr(model, "tokenize", tokenize)
    return threads


async def test_a_long_input_is_tokenised_off_the_event_loop(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = engine._loaded["a"].weights.model
    tokens = model.tokenize(LONG, add_special=True)
    expected = len(tokens)
    assert len(LONG) > engine_module.INLINE_INPUT_CHARS
    threads = record_threads(monkeypatch, model)
    loop = threading.get_ident()

    assert await engine.count_tokens("a", prompt="Hello") == 2
    assert threads == [loop]

    threads.clear()
    assert await engine.count_tokens("a", prompt=LONG) == expected
    assert await engine.tokenize("a", LONG, True) == tokens
    with pytest.raises(InvalidArgument, match=f"prompt is {expected} tokens"):
        async for _ in engine.generate(Request("a", Sampling(max_tokens=1), prompt=LONG)):
            pass
    assert len(threads) == 3
    assert loop not in threads


async def test_a_long_token_list_is_detokenised_off_the_event_loop(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = engine._loaded["a"].weights.model
    text = LONG * 2
    tokens = model.tokenize(text, add_special=False)
    assert len(tokens) > engine_module.INLINE_TOKENS
    threads: set[int] = set()
    real = model.piece

    def piece(token: int, *, special: bool = False) -> bytes:
        threads.add(threading.get_ident())
        return real(token, special=special)

    monkeypatch.setattr(model, "piece", piece)
    short = await engine.detokenize("a", tokens[:8])
    assert short
    assert text.startswith(short)
    assert threads == {threading.get_ident()}
    threads.clear()
    assert await engine.detokenize("a", tokens) == text
    assert threads
    assert threading.get_ident() not in threads


async def test_unloading_while_a_thread_tokenises_frees_the_weights_after_it(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = engine._loaded["a"].weights.model
    expected = len(model.tokenize(LONG, add_special=True))
    entered, go = threading.Event(), threading.Event()
    real: Callable[..., list[int]] = model.tokenize

    def tokenize(text: str, *, add_special: bool, parse_special: bool = True) -> list[int]:
        entered.set()
        assert go.wait(30)
        return real(text, add_special=add_special, parse_special=parse_special)

    monkeypatch.setattr(model, "tokenize", tokenize)
    counting = asyncio.create_task(engine.count_tokens("a", prompt=LONG))
    assert await asyncio.to_thread(entered.wait, 30)

    await engine.unload("a")
    # The thread still reads the vocabulary: the weights stay until it is done.
    assert model.ptr is not None
    assert engine.weights_loaded == 1

    go.set()
    assert await counting == expected
    assert model.ptr is None
    assert engine.weights_loaded == 0
