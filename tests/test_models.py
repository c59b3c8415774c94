"""Model lifecycle: shared weights, memory budget, LRU keep-alive, on-demand load, quantize."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from helpers import SHARED_MODELS_DIR
from prometheus_client import CollectorRegistry

from inference_local.config import InferenceLocalConfig, ModelConfig
from inference_local.engine import Delta, End, Engine, LoadSpec, Request
from inference_local.sampling import Sampling
from slm.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted

FILE = "gemma-3-270m-q4_k_m.gguf"


def make_engine(tmp_path: Path, **overrides: object) -> Engine:
    fields: dict[str, object] = {
        "models_dir": SHARED_MODELS_DIR,
        "cache_dir": tmp_path / "quantized",
        "models": [],
        "parallel": 2,
        "keep_alive_s": 0,
        **overrides,
    }
    return Engine(InferenceLocalConfig(**fields), CollectorRegistry())


@pytest.fixture
async def engine(model_path: Path, tmp_path: Path) -> AsyncIterator[Engine]:
    e = make_engine(tmp_path)
    await e.start()
    yield e
    await e.close()


async def generate_text(engine: Engine, name: str) -> str:
    request = Request(name, Sampling(max_tokens=4, temperature=0), prompt="Hello")
    return "".join([e.text async for e in engine.generate(request) if isinstance(e, Delta)])


async def test_two_names_share_one_copy_of_the_weights(engine: Engine) -> None:
    await engine.load(LoadSpec("a", FILE, context_length=256))
    # llguidance's view of the vocabulary is built by the load, not while the model serves.
    grammars = engine._loaded["a"].weights.grammars
    assert grammars is not None
    assert grammars.ready
    await engine.load(LoadSpec("b", FILE, context_length=256))
    assert engine.weights_loaded == 1
    # And one constrained-decoding state: the vocabulary is read once, grammars compiled once.
    schedulers = [engine._loaded[name].scheduler for name in ("a", "b")]
    assert schedulers[0] is not None
    assert schedulers[1] is not None
    assert schedulers[0].members[0]._grammars is schedulers[1].members[0]._grammars
    assert await generate_text(engine, "a") == await generate_text(engine, "b")
    await engine.unload("a")
    assert await generate_text(engine, "b")
    assert {m.name: m.loaded for m in engine.models()} == {"b": True}
    with pytest.raises(NotFound):
        await engine.unload("a")
    info = next(m for m in engine.models() if m.name == "b")
    assert (info.architecture, info.context_length) == ("gemma3", 256)
    assert not info.has_chat_template
    assert info.size_bytes > 100 << 20


async def test_decode_contexts_split_the_slots_and_each_serves_its_share(engine: Engine) -> None:
    """decode_contexts=2 gives a model two llama.cpp contexts over the one copy of its
    weights, each with half the slots and a decode thread of its own; two requests at once go
    one to each, and each is the text the same prompt gets alone in a one-context model."""
    await engine.load(LoadSpec("one", FILE, context_length=256, parallel=1))
    await engine.load(LoadSpec("split", FILE, context_length=256, parallel=2, decode_contexts=2))
    assert engine.weights_loaded == 1
    split = engine._loaded["split"]
    group = split.scheduler
    assert group is not None
    assert [m.config.n_slots for m in group.members] == [1, 1]
    # On this CPU no stream's tokens are held for a stream interval (unset: 0 off a GPU).
    assert [m.config.stream_interval_s for m in group.members] == [0.0, 0.0]
    assert len({id(c) for c in split.contexts}) == 2
    prompts = ["The capital of France is", "Once upon a time, a small robot"]

    async def text(name: str, prompt: str) -> str:
        request = Request(name, Sampling(max_tokens=6, temperature=0), prompt=prompt)
        return "".join([e.text async for e in engine.generate(request) if isinstance(e, Delta)])

    alone = [await text("one", p) for p in prompts]
    assert await asyncio.gather(*(text("split", p) for p in prompts)) == alone
    lengths = [len(split.weights.model.tokenize(p, add_special=True)) for p in prompts]
    assert [m.prompt_tokens_decoded for m in group.members] == lengths
    await engine.unload("split")
    assert await text("one", prompts[0]) == alone[0]


async def test_a_request_needing_more_slots_than_one_decode_context_is_refused(
    engine: Engine,
) -> None:
    """A request's choices share one context: n above a context's slots is refused with the
    reason, n within them is served; contexts never outnumber the slots."""
    await engine.load(LoadSpec("split", FILE, context_length=256, parallel=4, decode_contexts=2))
    prompt = "Hello"
    three = Request("split", Sampling(max_tokens=2), prompt=prompt, n=3)
    with pytest.raises(InvalidArgument, match="over 2 decode contexts") as refused:
        [e async for e in engine.generate(three)]
    assert refused.value.field == "sampling.n"
    request = Request("split", Sampling(max_tokens=2, temperature=0), prompt=prompt, n=2)
    ends = [e for e in [e async for e in engine.generate(request)] if isinstance(e, End)]
    assert [c.index for c in ends[0].choices] == [0, 1]
    await engine.load(LoadSpec("small", FILE, context_length=256, parallel=2, decode_contexts=8))
    small = engine._loaded["small"].scheduler
    assert small is not None
    assert [m.config.n_slots for m in small.members] == [1, 1]


async def test_repacked_weights_are_a_copy_of_their_own(engine: Engine) -> None:
    """The repacked CPU layout (the default) cannot be shared with the plain one: the same file
    asked for with repack_weights=false is a second copy, and it serves; a model without the
    option shares the default's weights."""
    await engine.load(LoadSpec("repacked", FILE, context_length=256))
    await engine.load(LoadSpec("plain", FILE, context_length=256, repack_weights=False))
    assert engine.weights_loaded == 2
    assert await generate_text(engine, "plain")
    await engine.load(LoadSpec("also-repacked", FILE, context_length=256, repack_weights=True))
    assert engine.weights_loaded == 2
    with pytest.raises(FailedPrecondition, match="already loaded"):
        await engine.load(LoadSpec("plain", FILE, context_length=256, repack_weights=True))


async def test_gpu_offload_on_a_cpu_build_is_refused_and_nothing_is_held(
    engine: Engine,
) -> None:
    """gpu_layers asks for layers on the GPU; this machine's llama.cpp has no GPU backend, so
    the load fails with a reason instead of silently running on the CPU. gpu_layers=0 (all on
    the CPU) loads, as a copy of its own next to llama.cpp's default placement."""
    with pytest.raises(FailedPrecondition, match=r"gpu_layers=-1 .* no GPU backend"):
        await engine.load(LoadSpec("offload", FILE, context_length=256, gpu_layers=-1))
    assert (engine.weights_loaded, engine.models()) == (0, [])
    await engine.load(LoadSpec("cpu", FILE, context_length=256, gpu_layers=0))
    await engine.load(LoadSpec("default", FILE, context_length=256))
    assert engine.weights_loaded == 2
    assert await generate_text(engine, "cpu") == await generate_text(engine, "default")
    with pytest.raises(FailedPrecondition, match="already loaded"):
        await engine.load(LoadSpec("cpu", FILE, context_length=256, gpu_layers=4))


async def test_paths_stay_inside_the_model_directories(engine: Engine) -> None:
    with pytest.raises(InvalidArgument, match="outside the model directories"):
        await engine.load(LoadSpec("evil", "../../../etc/passwd"))
    with pytest.raises(InvalidArgument, match="outside the model directories"):
        await engine.load(LoadSpec("evil", "/etc/passwd"))
    with pytest.raises(InvalidArgument, match="does not exist"):
        await engine.load(LoadSpec("missing", "nope.gguf"))


async def test_memory_budget_refuses_with_the_numbers(model_path: Path, tmp_path: Path) -> None:
    engine = make_engine(tmp_path, memory_budget_mb=100)
    with pytest.raises(ResourceExhausted, match=r"needs about \d+ MiB, 0 MiB of the 100 MiB"):
        await engine.load(LoadSpec("big", FILE))
    await engine.close()


async def test_lru_eviction_and_pinning(model_path: Path, tmp_path: Path) -> None:
    engine = make_engine(tmp_path, max_loaded_models=1)
    await engine.load(LoadSpec("first", FILE, context_length=256))
    await engine.load(LoadSpec("second", FILE, context_length=256))
    assert [m.name for m in engine.models() if m.loaded] == ["second"]
    assert engine.metrics.evictions.labels("first", "memory")._value.get() == 1
    await engine.close()

    engine = make_engine(tmp_path, max_loaded_models=1)
    await engine.load(LoadSpec("pinned", FILE, context_length=256, pinned=True))
    with pytest.raises(ResourceExhausted, match="the maximum is 1"):
        await engine.load(LoadSpec("other", FILE, context_length=256))
    await engine.close()


async def test_keep_alive_unloads_idle_unpinned_models(model_path: Path, tmp_path: Path) -> None:
    engine = make_engine(tmp_path, keep_alive_s=60)
    await engine.load(LoadSpec("idle", FILE, context_length=256))
    await engine.load(LoadSpec("kept", FILE, context_length=256, pinned=True))
    import time

    assert await engine.evict_idle(time.monotonic()) == []
    assert await engine.evict_idle(time.monotonic() + 3600) == ["idle"]
    assert [m.name for m in engine.models() if m.loaded] == ["kept"]
    await engine.close()


async def test_configured_model_loads_on_demand(model_path: Path, tmp_path: Path) -> None:
    lazy = ModelConfig(name="lazy", path=FILE, preload=False, context_length=256)
    engine = make_engine(tmp_path, models=[lazy])
    await engine.start()
    assert [(m.name, m.loaded) for m in engine.models()] == [("lazy", False)]
    assert await generate_text(engine, "lazy")
    assert [(m.name, m.loaded) for m in engine.models()] == [("lazy", True)]
    samples = {s.name: s.value for s in engine.metrics.load_wait.labels("lazy")._samples()}
    assert samples["_count"] == 1
    await engine.close()


async def test_quantize_on_load_writes_the_cache_once(engine: Engine, tmp_path: Path) -> None:
    await engine.load(LoadSpec("q8", FILE, context_length=256, quantization="q8_0"))
    cached = list((tmp_path / "quantized").glob("*.gguf"))
    assert [p.name for p in cached] == ["gemma-3-270m-q4_k_m.q8_0.gguf"]
    assert await generate_text(engine, "q8")
    with pytest.raises(InvalidArgument, match="unknown quantization"):
        await engine.load(LoadSpec("bad", FILE, quantization="q3_xyz"))


async def test_embeddings_only_from_embedding_models(engine: Engine) -> None:
    await engine.load(LoadSpec("embed", FILE, context_length=256, embeddings=True))
    vectors, tokens = await engine.embed("embed", ["hello world", "a cat sat on the mat"])
    assert len(vectors) == 2
    assert len(vectors[0]) == 640
    assert vectors[0] != vectors[1]
    assert tokens > 4
    with pytest.raises(FailedPrecondition, match="serves embeddings, not generation"):
        await generate_text(engine, "embed")
    await engine.load(LoadSpec("gen", FILE, context_length=256))
    with pytest.raises(FailedPrecondition, match="does not serve embeddings"):
        await engine.embed("gen", ["x"])


def test_a_models_gauges_sum_its_decode_contexts() -> None:
    """Each context's scheduler reports its own running, waiting and KV use; the model's
    gauges show the sums (KV: the mean over its alike contexts), not whichever stepped last."""
    from inference_local.engine import EngineMetrics, _ContextLoads, _ModelMetrics

    registry = CollectorRegistry()
    metrics = EngineMetrics(registry)
    loads = _ContextLoads(2)
    first, second = (_ModelMetrics(metrics, "m", loads, i) for i in range(2))

    def gauges() -> tuple[float | None, ...]:
        names = ("slm_engine_running_sequences", "slm_engine_waiting_requests")
        values = [registry.get_sample_value(n, {"model": "m"}) for n in names]
        return (*values, registry.get_sample_value("slm_engine_kv_used_ratio", {"model": "m"}))

    first.step(4, running=3, waiting=1, kv_used=0.5)
    second.step(2, running=2, waiting=0, kv_used=0.25)
    assert gauges() == (5, 1, 0.375)
    first.idle(waiting=2)
    assert gauges() == (2, 2, 0.125)


def test_decode_contexts_default_splits_only_on_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """Unset, a model on a GPU gets up to four contexts of at least MAX_N (8) slots each, so no
    n that one context would take is refused; on a CPU, or for an embedding model, one; a set
    decode_contexts is taken as it is (at most one a slot)."""
    from inference_local import engine as engine_module
    from inference_local.engine import _decode_contexts, _slot_shares

    def shares(n_slots: int, **fields: object) -> list[int]:
        spec = LoadSpec("m", FILE, **fields)  # type: ignore[arg-type]
        return _slot_shares(n_slots, _decode_contexts(spec, n_slots)[0])

    monkeypatch.setattr(engine_module, "gpu_offload_supported", lambda: True)
    assert shares(1) == [1]
    assert shares(8) == [8]
    assert shares(15) == [15]
    assert shares(16) == [8, 8]
    assert shares(24) == [8, 8, 8]
    assert shares(32) == [8, 8, 8, 8]
    assert shares(64) == [16, 16, 16, 16]
    assert shares(64, gpu_layers=0) == [64]  # the model stays on the CPU
    assert shares(64, embeddings=True) == [64]
    assert shares(64, decode_contexts=1) == [64]
    assert shares(5, decode_contexts=3) == [2, 2, 1]
    assert shares(2, decode_contexts=8) == [1, 1]
    assert "auto on a GPU" in _decode_contexts(LoadSpec("m", FILE), 32)[1]
    monkeypatch.setattr(engine_module, "gpu_offload_supported", lambda: False)
    assert shares(64) == [64]
    assert _decode_contexts(LoadSpec("m", FILE), 64) == (1, "auto: one on a CPU")


def test_stream_interval_default_holds_tokens_only_on_a_gpu(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Unset, a model on a GPU sends a stream's tokens at most every 20 ms; on a CPU a message a
    step; a set stream_interval_s is taken as it is."""
    from inference_local import engine as engine_module

    spec = LoadSpec("m", FILE)
    engine = make_engine(tmp_path)
    monkeypatch.setattr(engine_module, "gpu_offload_supported", lambda: True)
    assert engine._stream_interval(spec)[0] == 0.02
    assert engine._stream_interval(LoadSpec("m", FILE, gpu_layers=0))[0] == 0.0
    assert make_engine(tmp_path, stream_interval_s=0.05)._stream_interval(spec)[0] == 0.05
    assert make_engine(tmp_path, stream_interval_s=0)._stream_interval(spec)[0] == 0.0
    monkeypatch.setattr(engine_module, "gpu_offload_supported", lambda: False)
    assert engine._stream_interval(spec) == (
        0.0,
        "auto: none on a CPU, where a step takes as long as the interval",
    )
