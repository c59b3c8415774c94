"""The model manifest: resident / standby / remote tiers and their budgets, co-activation warming,
and replacing the manifest with a drain (engine level; tests/test_gateway_admin_manifest.py
drives it over the admin API, tests/test_manifest_reload.py by SIGHUP)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from helpers import SHARED_MODELS_DIR, until
from prometheus_client import CollectorRegistry

from inference_local.config import GEMMA_CHAT_TEMPLATE, InferenceLocalConfig, ModelConfig
from inference_local.engine import Delta, End, Engine, ModelInfo, Request
from inference_local.sampling import Sampling
from slm.errors import (
    Aborted,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
)

FILE = "gemma-3-270m-q4_k_m.gguf"


@pytest.fixture
def models_dir(model_path: Path, tmp_path: Path) -> Path:
    """A models directory with the bundled GGUF under two names: the second is another file to
    the engine (weights of its own), as a specialist of another model would be."""
    folder = tmp_path / "models"
    folder.mkdir()
    source = SHARED_MODELS_DIR / FILE
    for name in (FILE, "specialist.gguf"):
        try:
            os.link(source, folder / name)
        except OSError:
            shutil.copyfile(source, folder / name)
    return folder


def entry(name: str, tier: str | None = None, path: str = FILE, **fields: object) -> ModelConfig:
    values: dict[str, object] = {"name": name, "path": path, "context_length": 256, **fields}
    if tier is not None:
        values["tier"] = tier
    return ModelConfig(**values)


def make_engine(models_dir: Path, models: list[ModelConfig], **overrides: object) -> Engine:
    fields: dict[str, object] = {
        "models_dir": models_dir,
        "models": models,
        "parallel": 2,
        "keep_alive_s": 0,
        **overrides,
    }
    return Engine(InferenceLocalConfig(**fields), CollectorRegistry())


@pytest.fixture
async def tiered(models_dir: Path) -> AsyncIterator[Engine]:
    engine = make_engine(
        models_dir,
        [
            entry("router", "resident"),
            entry(
                "specialist",
                "standby",
                "specialist.gguf",
                co_activation=["router"],
                chat_template=GEMMA_CHAT_TEMPLATE,
            ),
            entry("big", "remote", "not-here.gguf"),
        ],
    )
    await engine.start()
    yield engine
    await engine.close()


def state(engine: Engine) -> dict[str, tuple[str, str]]:
    return {m.name: (m.tier, m.state) for m in engine.models()}


def info(engine: Engine, name: str) -> ModelInfo:
    return next(m for m in engine.models() if m.name == name)


async def generate(engine: Engine, name: str, max_tokens: int = 4) -> tuple[str, End]:
    request = Request(name, Sampling(max_tokens=max_tokens, temperature=0), prompt="Hello")
    text, end = [], None
    async for event in engine.generate(request):
        if isinstance(event, Delta):
            text.append(event.text)
        else:
            end = event
    assert end is not None
    return "".join(text), end


async def test_tiers_hold_what_they_say(tiered: Engine) -> None:
    """Resident: ready at start, pinned. Standby: weights mapped, no context, until a request;
    idle, it goes back to mapped weights, not to disk. Remote: nothing here."""
    assert state(tiered) == {
        "router": ("resident", "ready"),
        "specialist": ("standby", "mapped"),
        "big": ("remote", "unloaded"),
    }
    assert tiered.weights_loaded == 2
    mapped = info(tiered, "specialist")
    assert mapped.memory_bytes == tiered._mapped["specialist"].memory_bytes > 200 << 20
    assert mapped.has_chat_template
    assert info(tiered, "router").pinned
    assert info(tiered, "router").memory_bytes > info(tiered, "router").size_bytes

    text, _ = await generate(tiered, "specialist")
    assert text
    ready = info(tiered, "specialist")
    assert ready.state == "ready"
    assert ready.memory_bytes > mapped.memory_bytes

    evicted = await tiered.evict_idle(float("inf"))
    assert evicted == ["specialist"]
    assert state(tiered)["specialist"] == ("standby", "mapped")
    assert state(tiered)["router"] == ("resident", "ready")
    assert tiered.weights_loaded == 2
    # Mapped weights serve again without reading the file anew.
    assert (await generate(tiered, "specialist"))[0] == text


async def test_a_remote_model_is_refused_so_the_next_tier_serves_it(tiered: Engine) -> None:
    with pytest.raises(Unavailable, match="remote tier") as raised:
        await generate(tiered, "big")
    assert raised.value.reason == "MODEL_REMOTE"
    with pytest.raises(NotFound, match=r"available: router, specialist\)"):
        await generate(tiered, "nobody")


async def test_a_router_request_warms_its_specialist(tiered: Engine) -> None:
    await generate(tiered, "router")
    await until(lambda: state(tiered)["specialist"] == ("standby", "ready"))
    samples = tiered.metrics.co_activations.labels("router", "specialist", "warmed")
    assert samples._value.get() == 1
    # Already ready: the next router request has nothing to warm.
    await generate(tiered, "router")
    assert tiered.metrics.co_activations.labels("router", "specialist", "ready")._value.get() == 1


async def test_budgets_refuse_a_manifest_with_the_numbers(models_dir: Path) -> None:
    models = [entry("router", "resident"), entry("specialist", "standby", "specialist.gguf")]
    with pytest.raises(FailedPrecondition, match=r"resident tier needs \d+ MiB \(router \d+ MiB\)"):
        await make_engine(models_dir, models, resident_budget_mb=64).start()
    with pytest.raises(
        FailedPrecondition, match=r"standby tier needs \d+ MiB \(specialist \d+ MiB\), its budget"
    ):
        await make_engine(models_dir, models, standby_budget_mb=10).start()
    # Each tier within its own budget, both together beyond the memory budget.
    with pytest.raises(FailedPrecondition, match=r"together, the memory budget is 400 MiB"):
        await make_engine(
            models_dir, models, memory_budget_mb=400, resident_budget_mb=350, standby_budget_mb=300
        ).start()

    engine = make_engine(models_dir, [entry("router", "resident")])
    await engine.start()
    try:
        before = state(engine)
        with pytest.raises(FailedPrecondition, match="its budget is 100 MiB"):
            await engine.apply_manifest(models, standby_budget_mb=100)
        assert state(engine) == before
    finally:
        await engine.close()


async def test_a_bad_manifest_is_refused_whole(tiered: Engine) -> None:
    before = state(tiered)
    with pytest.raises(InvalidArgument, match="at least one model"):
        await tiered.apply_manifest([])
    with pytest.raises(InvalidArgument, match="'x' appears twice"):
        await tiered.apply_manifest([entry("x"), entry("x")])
    with pytest.raises(InvalidArgument, match="co_activation names 'nobody'"):
        await tiered.apply_manifest([entry("x", "standby", co_activation=["nobody"])])
    with pytest.raises(InvalidArgument, match=r"model 'y': .*missing.gguf does not exist"):
        await tiered.apply_manifest([entry("x", "resident"), entry("y", "standby", "missing.gguf")])
    assert state(tiered) == before


async def test_dry_run_reports_and_changes_nothing(tiered: Engine) -> None:
    before = state(tiered)
    result = await tiered.apply_manifest(
        [entry("router", "resident"), entry("other", "standby", "specialist.gguf")], dry_run=True
    )
    assert (result.change.added, result.change.removed) == (("other",), ("specialist", "big"))
    assert result.change.kept == ("router",)
    assert {m.name: m.state for m in result.models} == {"router": "ready", "other": "mapped"}
    # Each with its share of its tier's budget: the standby one its weights.
    assert [m.memory_bytes > 200 << 20 for m in result.models] == [True, True]
    assert state(tiered) == before


async def test_replace_drains_in_flight_and_holds_new_requests(tiered: Engine) -> None:
    """The generation in flight finishes on the old manifest; one that arrives during the
    switch waits and runs on the new one (its model exists only there); an unchanged model
    is kept loaded, not reloaded."""
    router = tiered._loaded["router"]
    request = Request("specialist", Sampling(max_tokens=48, temperature=0), prompt="Once upon")
    running = aiter(tiered.generate(request))
    first = await anext(running)
    assert isinstance(first, Delta)

    new = [entry("router", "resident"), entry("fresh", "resident", "specialist.gguf")]
    applying = asyncio.create_task(tiered.apply_manifest(new))
    await until(lambda: tiered._switching is not None)
    held = asyncio.create_task(generate(tiered, "fresh"))
    rest = [event async for event in running]
    end = rest[-1]
    assert isinstance(end, End)
    assert end.completion_tokens == 48  # finished whole on the old manifest
    result = await applying
    assert result.change.removed == ("specialist", "big")
    assert (result.change.added, result.change.kept) == (("fresh",), ("router",))
    text, _ = await held
    assert text
    assert tiered._loaded["router"] is router
    assert state(tiered) == {"router": ("resident", "ready"), "fresh": ("resident", "ready")}
    with pytest.raises(NotFound):
        await generate(tiered, "specialist")


async def test_a_drain_that_times_out_keeps_the_old_manifest(tiered: Engine) -> None:
    def tiers() -> dict[str, str]:
        return {m.name: m.tier for m in tiered.models()}

    before = tiers()
    request = Request("router", Sampling(max_tokens=64, temperature=0), prompt="Once upon")
    running = aiter(tiered.generate(request))
    await anext(running)
    with pytest.raises(DeadlineExceeded, match="1 generation"):
        await tiered.apply_manifest([entry("router", "resident")], drain_timeout_s=0.05)
    end = [event async for event in running][-1]
    assert isinstance(end, End)
    assert end.completion_tokens == 64
    assert tiers() == before
    assert (await generate(tiered, "specialist"))[0]


async def test_new_requests_wait_a_bounded_time_then_go_elsewhere(models_dir: Path) -> None:
    engine = make_engine(models_dir, [entry("router", "resident")], manifest_wait_s=0.05)
    await engine.start()
    try:
        request = Request("router", Sampling(max_tokens=64, temperature=0), prompt="Once upon")
        running = aiter(engine.generate(request))
        await anext(running)
        applying = asyncio.create_task(engine.apply_manifest([entry("router", "resident")]))
        await until(lambda: engine._switching is not None)
        with pytest.raises(Unavailable, match="being replaced") as raised:
            await generate(engine, "router")
        assert raised.value.reason == "MANIFEST_SWITCHING"
        with pytest.raises(Aborted, match="another model manifest"):
            await engine.apply_manifest([entry("router", "resident")])
        _ = [event async for event in running]
        assert (await applying).change.kept == ("router",)
        assert (await generate(engine, "router"))[0]
    finally:
        await engine.close()


def test_tier_fields_are_checked_in_the_config() -> None:
    with pytest.raises(ValueError, match="tier replaces preload and pinned"):
        ModelConfig(name="a", path=FILE, tier="standby", pinned=True)
    # Only a model package is imported to assemble a missing file, never any module.
    with pytest.raises(ValueError, match="should match pattern"):
        ModelConfig(name="a", path=FILE, package="os")
    with pytest.raises(ValueError, match="a resident one is never warmed"):
        ModelConfig(name="a", path=FILE, tier="resident", co_activation=["b"])
    with pytest.raises(ValueError, match="co_activation names 'b', not a model served here"):
        InferenceLocalConfig(
            models=[entry("a", "standby", co_activation=["b"]), entry("b", "remote")]
        )


class HeldOpen:
    """Holds the engine's context allocation (in its worker thread) until released, so a test
    can cancel what waits for it while the thread is still working."""

    def __init__(self, engine: Engine) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.finished = threading.Event()
        real = engine._open

        def held(*args: Any) -> Any:
            self.entered.set()
            self.release.wait(timeout=60)
            try:
                return real(*args)
            finally:
                self.finished.set()

        engine._open = held  # type: ignore[method-assign,assignment]

    async def wait_entered(self) -> None:
        assert await asyncio.to_thread(self.entered.wait, 60)

    async def assert_waited_for(self, task: asyncio.Task[Any]) -> None:
        """`task` cannot end while the thread is held; then the thread is let go and it ends
        once the thread has (a task that ended at once would free what the thread uses)."""
        done, _ = await asyncio.wait({task}, timeout=1.0)
        assert not done
        self.release.set()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        assert self.finished.is_set()


async def test_closing_while_a_specialist_warms_waits_for_its_thread(tiered: Engine) -> None:
    """close() cancels the warming; the thread allocating the context cannot be stopped, so its
    model must not be freed under it (this crashed the process before)."""
    held = HeldOpen(tiered)
    await generate(tiered, "router")
    await held.wait_entered()
    warming = tiered._warming["specialist"]
    closing = asyncio.create_task(tiered.close())
    await until(lambda: warming.cancelling() > 0)
    await held.assert_waited_for(closing)
    assert warming.cancelled()
    assert tiered.weights_loaded == 0


async def test_a_client_leaving_during_a_cold_load_leaves_nothing_half_made(
    tiered: Engine,
) -> None:
    held = HeldOpen(tiered)
    request = asyncio.create_task(generate(tiered, "specialist"))
    await held.wait_entered()
    request.cancel()
    await held.assert_waited_for(request)
    assert request.cancelled()
    assert state(tiered)["specialist"] == ("standby", "mapped")
    assert (await generate(tiered, "specialist"))[0]


def test_a_manifest_entry_carries_its_decode_contexts() -> None:
    """ApplyManifest's decode_contexts becomes the entry's (0: the default), and one out of
    range is INVALID_ARGUMENT naming it."""
    from inference_local.servicer import manifest_from_proto
    from slm.v1 import inference_pb2

    def entry(**fields: Any) -> Any:
        return inference_pb2.ManifestModel(name="m", path="m.gguf", **fields)

    given, default = manifest_from_proto([entry(decode_contexts=2), entry()])
    assert (given.decode_contexts, default.decode_contexts) == (2, None)
    with pytest.raises(InvalidArgument, match="decode_contexts") as refused:
        manifest_from_proto([entry(decode_contexts=17)])
    assert refused.value.field == "models[0].decode_contexts"
