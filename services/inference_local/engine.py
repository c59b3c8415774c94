"""The llama.cpp engine: model lifecycle under memory guardrails, and generation through the
continuous-batching scheduler of each loaded model. Plain Python types; no transport."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import functools
import logging
import math
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from inference_local import tools
from inference_local.chat_template import ChatTemplate, Message
from inference_local.config import InferenceLocalConfig, ModelConfig, check_manifest_names
from inference_local.constraints import Constraint, Grammars
from inference_local.llama_api import (
    Batch,
    Context,
    ContextParams,
    LoraAdapter,
    Model,
    ModelMetadata,
    gpu_offload_supported,
    quantize,
)
from inference_local.manifest import Budgets, Change, Share, budgets_of, check_budgets, diff
from inference_local.models import ensure_model_file
from inference_local.prefix_cache import PrefixCache
from inference_local.sampling import Sampling, TokenLogprob
from inference_local.scheduler import (
    MAX_N,
    AdapterSet,
    Scheduler,
    SchedulerConfig,
    SchedulerGroup,
    SchedulerMetrics,
    SeqRequest,
)
from inference_local.scheduler import Delta as SeqDelta
from inference_local.scheduler import Finish as SeqFinish
from inference_local.tools import ToolCallDelta, ToolCallParser, ToolSpec
from slm.errors import (
    Aborted,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)

log = logging.getLogger(__name__)

__all__ = [
    "Adapter",
    "AdapterResolver",
    "ChoiceEnd",
    "Delta",
    "End",
    "Engine",
    "Event",
    "Finish",
    "LoadSpec",
    "ManifestResult",
    "ModelInfo",
    "Request",
]

MB = 1 << 20
T = TypeVar("T")
# Inputs longer than this (characters of prompt, messages and tools) are rendered and tokenised
# on a worker thread: llama.cpp tokenises about 1.5 MB/s on a 2-core host, so the 1 MiB prompt
# a body may carry would hold the event loop, and with it every stream this replica serves, for
# 0.6 s. Below it, tokenising takes under 10 ms (4,096 characters: 2 ms) and the hop to a
# thread would cost more than it frees.
INLINE_INPUT_CHARS = 16_384
# Token lists longer than this are detokenised on a worker thread: a piece is a call into
# llama.cpp, 6 ms for 4,096 of them here.
INLINE_TOKENS = 4_096


@dataclass(frozen=True)
class Request:
    model: str
    sampling: Sampling
    prompt: str | None = None
    messages: tuple[Message, ...] | None = None
    adapter: str = ""
    adapter_scale: float | None = None
    # Tools the model may call (chat input only); None: no tools.
    tools: ToolSpec | None = None
    # What the output must be (response_format); a tool choice may replace or extend it.
    constraint: Constraint | None = None
    # Independent completions of the prompt, sharing its KV state.
    n: int = 1


class Finish(enum.Enum):
    STOP = "stop"
    LENGTH = "length"
    CANCELLED = "cancelled"
    # The choice called tools (and then ended as STOP would).
    TOOL_CALLS = "tool_calls"


_FINISH = {
    SeqFinish.STOP: Finish.STOP,
    SeqFinish.LENGTH: Finish.LENGTH,
    SeqFinish.CANCELLED: Finish.CANCELLED,
}


@dataclass(frozen=True)
class Delta:
    """Generated text of a choice: content, and pieces of the tool calls it makes."""

    text: str
    logprobs: tuple[TokenLogprob, ...] = ()
    index: int = 0
    tool_calls: tuple[ToolCallDelta, ...] = ()


@dataclass(frozen=True)
class ChoiceEnd:
    index: int
    finish: Finish
    completion_tokens: int
    # The stop string that ended the choice, if one did.
    stop_sequence: str = ""


@dataclass(frozen=True)
class End:
    """The last event: `finish` is choice 0's, `completion_tokens` counts every choice."""

    finish: Finish
    prompt_tokens: int
    completion_tokens: int
    model: str
    choices: tuple[ChoiceEnd, ...] = ()
    # Choice 0's stop string, if one ended it.
    stop_sequence: str = ""


Event = Delta | End


@dataclass(frozen=True)
class _Prompt:
    tokens: list[int]
    constraint: Constraint | None
    # The tools a call may name; None: the output is not parsed for tool calls.
    tool_names: frozenset[str] | None


@dataclass(frozen=True)
class LoadSpec:
    name: str
    path: str
    context_length: int | None = None
    parallel: int | None = None
    quantization: str | None = None
    pinned: bool = False
    embeddings: bool = False
    chat_template: str | None = None
    package: str | None = None
    n_threads: int | None = None
    repack_weights: bool | None = None
    gpu_layers: int | None = None
    backend_sampling: bool | None = None
    decode_contexts: int | None = None


@dataclass(frozen=True)
class ModelInfo:
    name: str
    context_length: int
    loaded: bool
    architecture: str = ""
    size_bytes: int = 0
    has_chat_template: bool = False
    pinned: bool = False
    embeddings: bool = False
    # The manifest's tier (config.ModelConfig.tier), and what is in memory: "unloaded",
    # "mapped" (weights only) or "ready" (weights and context).
    tier: str = "on_demand"
    state: str = "unloaded"
    memory_bytes: int = 0
    co_activation: tuple[str, ...] = ()


@dataclass(frozen=True)
class ManifestResult:
    """What applying a manifest did (or, for a dry run, would do)."""

    change: Change
    models: list[ModelInfo]
    drain_seconds: float = 0.0


@dataclass(frozen=True)
class Adapter:
    """A LoRA adapter as the registry describes it."""

    path: Path
    scale: float
    base_model: str


AdapterResolver = Callable[[str], Awaitable[Adapter]]


class EngineMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.tokens = Counter(
            "slm_engine_generated_tokens", "Tokens sampled.", ["model"], registry=registry
        )
        self.prompt_tokens = Counter(
            "slm_engine_prompt_tokens", "Prompt tokens prefilled.", ["model"], registry=registry
        )
        self.requests = Counter(
            "slm_engine_requests",
            "Generations finished, by reason.",
            ["model", "finish_reason"],
            registry=registry,
        )
        self.running = Gauge(
            "slm_engine_running_sequences", "Sequences in slots.", ["model"], registry=registry
        )
        self.waiting = Gauge(
            "slm_engine_waiting_requests",
            "Requests waiting for a slot.",
            ["model"],
            registry=registry,
        )
        self.batch_tokens = Histogram(
            "slm_engine_batch_tokens",
            "Tokens computed per scheduler step (a token per running sequence, prompt chunks).",
            ["model"],
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
            registry=registry,
        )
        self.moves = Counter(
            "slm_engine_sequence_moves",
            "Sequences moved to a lower slot to keep the running slots contiguous.",
            ["model"],
            registry=registry,
        )
        self.kv_used = Gauge(
            "slm_engine_kv_used_ratio", "Share of KV cells in use.", ["model"], registry=registry
        )
        self.inter_token = Histogram(
            "slm_engine_inter_token_seconds",
            "Time between two sampled tokens of one sequence.",
            ["model"],
            buckets=(0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56),
            registry=registry,
        )
        self.ttft = Histogram(
            "slm_engine_ttft_seconds",
            "Submission to first sampled token.",
            ["model"],
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=registry,
        )
        self.load_seconds = Histogram(
            "slm_engine_model_load_seconds",
            "Time to load a model.",
            ["model"],
            buckets=(0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
            registry=registry,
        )
        self.load_wait = Histogram(
            "slm_engine_model_load_wait_seconds",
            "Time requests waited for an on-demand load.",
            ["model"],
            buckets=(0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
            registry=registry,
        )
        self.loaded = Gauge(
            "slm_engine_model_loaded", "1 while the model is loaded.", ["model"], registry=registry
        )
        self.memory = Gauge(
            "slm_engine_model_memory_bytes",
            "Estimated weights + KV + compute of a loaded model.",
            ["model"],
            registry=registry,
        )
        self.evictions = Counter(
            "slm_engine_model_evictions",
            "Models unloaded to make room or after their keep-alive.",
            ["model", "reason"],
            registry=registry,
        )
        self.co_activations = Counter(
            "slm_engine_co_activations",
            "Specialists a router's request warmed (outcome: warmed, ready (nothing to do), "
            "failed).",
            ["router", "model", "outcome"],
            registry=registry,
        )
        self.manifest_applies = Counter(
            "slm_engine_manifest_applies",
            "Model manifests applied, by outcome (applied, refused, drain_timeout, failed).",
            ["outcome"],
            registry=registry,
        )


class _ContextLoads:
    """Running and waiting sequences and KV use of each of a model's contexts, which its
    gauges sum (KV: averaged over the contexts, which are alike)."""

    def __init__(self, contexts: int) -> None:
        self.running = [0] * contexts
        self.waiting = [0] * contexts
        self.kv_used = [0.0] * contexts


class _ModelMetrics(SchedulerMetrics):
    """Metrics of one context's scheduler (`member` of `loads`), labelled by the model."""

    def __init__(
        self, metrics: EngineMetrics, name: str, loads: _ContextLoads, member: int
    ) -> None:
        self._loads = loads
        self._member = member
        m = metrics
        self._tokens = m.tokens.labels(name)
        self._prompt = m.prompt_tokens.labels(name)
        self._requests = m.requests
        self._running = m.running.labels(name)
        self._waiting = m.waiting.labels(name)
        self._batch = m.batch_tokens.labels(name)
        self._kv = m.kv_used.labels(name)
        self._ttft = m.ttft.labels(name)
        self._itl = m.inter_token.labels(name)
        self._moves = m.moves.labels(name)
        self._name = name

    def step(self, batch_tokens: int, running: int, waiting: int, kv_used: float) -> None:
        self._batch.observe(batch_tokens)
        self._load(running, waiting, kv_used)

    def idle(self, waiting: int) -> None:
        self._load(0, waiting, 0.0)

    def _load(self, running: int, waiting: int, kv_used: float) -> None:
        loads, i = self._loads, self._member
        loads.running[i], loads.waiting[i], loads.kv_used[i] = running, waiting, kv_used
        self._running.set(sum(loads.running))
        self._waiting.set(sum(loads.waiting))
        self._kv.set(sum(loads.kv_used) / len(loads.kv_used))

    def token(self, n: int) -> None:
        self._tokens.inc(n)

    def moved(self) -> None:
        self._moves.inc()

    def first_token(self, seconds: float) -> None:
        self._ttft.observe(seconds)

    def inter_token(self, seconds: float) -> None:
        self._itl.observe(seconds)

    def finished(self, reason: str, prompt_tokens: int) -> None:
        self._requests.labels(self._name, reason).inc()
        self._prompt.inc(prompt_tokens)


# How a load turns a file into weights: its quantization, repacked layout and GPU layers.
Variant = tuple[str, bool, int | None]
WeightsKey = tuple[Path, Variant]


@dataclass(eq=False)
class _Weights:
    model: Model
    meta: ModelMetadata
    key: WeightsKey
    refs: int = 0
    # Constrained decoding over this vocabulary, shared by every name of these weights.
    grammars: Grammars | None = None


@dataclass(eq=False)
class _Mapping:
    """A standby model's hold on its weights: mapped in host memory, no context. `weights` is
    None on a GPU build, where creating the model would upload it: there the file's pages are
    kept in the host's page cache instead, and the first request loads from them."""

    path: Path
    weights: _Weights | None
    # Weights bytes this hold added to memory (0 when the file was already loaded).
    memory_bytes: int


@dataclass(eq=False)
class _Loaded:
    spec: LoadSpec
    weights: _Weights
    # One context, or for `decode_contexts` several that share the slots (see SchedulerGroup).
    contexts: list[Context]
    scheduler: SchedulerGroup | None
    template: ChatTemplate | None
    memory_bytes: int
    context_length: int
    # KV, logits and compute buffers: memory_bytes without the weights.
    context_bytes: int
    adapters: dict[str, tuple[LoraAdapter, float]] = field(default_factory=dict)
    embed_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def context(self) -> Context:
        return self.contexts[0]

    def close_contexts(self) -> None:
        for context in self.contexts:
            context.close()


class Engine:
    """Loads models and serves generations; the transport-free core of inference-local."""

    def __init__(
        self,
        config: InferenceLocalConfig,
        registry: CollectorRegistry,
        adapters: AdapterResolver | None = None,
        prefix_cache: PrefixCache | None = None,
    ) -> None:
        self.config = config
        self.metrics = EngineMetrics(registry)
        self._adapters = adapters
        self._prefix_cache = prefix_cache
        # The manifest in force: every configured model by name, and for each router the
        # specialists its requests warm.
        self._configured = {m.name: m for m in config.models}
        self._warms = _warms_of(config.models)
        self._budgets = budgets_of(config)
        self._loaded: dict[str, _Loaded] = {}
        self._mapped: dict[str, _Mapping] = {}
        self._weights: dict[WeightsKey, _Weights] = {}
        self._lock = asyncio.Lock()
        self._reaper: asyncio.Task[None] | None = None
        self._warming: dict[str, asyncio.Task[None]] = {}
        # Replacing the manifest: set while one is applied; generations wait on it.
        self._applying = asyncio.Lock()
        self._switching: asyncio.Event | None = None
        self._inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    # --- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        models = list(self.config.models)
        # At start only the tiers that hold memory are measured against their budgets; an
        # on-demand model's file is looked for when it is first asked for, as before tiers.
        await self._shares(models, every_file=False)
        async with self._lock:
            await self._bring_up(models)
        if self.config.keep_alive_s > 0:
            self._reaper = asyncio.get_running_loop().create_task(self._reap())

    async def close(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
        for task in list(self._warming.values()):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        async with self._lock:
            for name in list(self._loaded):
                await self._unload_locked(name, "shutdown")
            for name in list(self._mapped):
                self._unmap(name)

    async def _reap(self) -> None:
        period = max(1.0, min(30.0, self.config.keep_alive_s / 4))
        while True:
            await asyncio.sleep(period)
            await self.evict_idle(time.monotonic())

    async def evict_idle(self, now: float) -> list[str]:
        """Unload unpinned models idle for longer than the keep-alive."""
        evicted = []
        async with self._lock:
            for name, loaded in list(self._loaded.items()):
                scheduler = loaded.scheduler
                idle = (
                    scheduler is not None
                    and scheduler.busy == 0
                    and (now - scheduler.last_used > self.config.keep_alive_s)
                )
                if idle and not loaded.spec.pinned:
                    await self._unload_locked(name, "keep_alive")
                    evicted.append(name)
        return evicted

    # --- models ----------------------------------------------------------------------------

    def models(self) -> list[ModelInfo]:
        infos = [self._info(loaded) for loaded in self._loaded.values()]
        for name, entry in self._configured.items():
            if name in self._loaded:
                continue
            mapping = self._mapped.get(name)
            weights = mapping.weights if mapping is not None else None
            infos.append(
                ModelInfo(
                    name,
                    entry.context_length,
                    False,
                    architecture=weights.meta.architecture if weights else "",
                    size_bytes=weights.meta.size_bytes if weights else 0,
                    has_chat_template=bool(
                        entry.chat_template or (weights and weights.meta.chat_template)
                    ),
                    pinned=_spec_from_config(entry).pinned,
                    embeddings=entry.embeddings,
                    tier=entry.effective_tier,
                    state="mapped" if mapping is not None else "unloaded",
                    memory_bytes=_file_size(mapping.path) if mapping is not None else 0,
                    co_activation=tuple(entry.co_activation),
                )
            )
        return infos

    def _info(self, loaded: _Loaded) -> ModelInfo:
        meta = loaded.weights.meta
        entry = self._configured.get(loaded.spec.name)
        configured = entry is not None and _spec_from_config(entry) == loaded.spec
        if entry is not None and configured:
            tier = entry.effective_tier
        else:
            tier = "resident" if loaded.spec.pinned else "on_demand"
        return ModelInfo(
            name=loaded.spec.name,
            context_length=loaded.context_length,
            loaded=True,
            architecture=meta.architecture,
            size_bytes=meta.size_bytes,
            has_chat_template=loaded.template is not None,
            pinned=loaded.spec.pinned,
            embeddings=loaded.spec.embeddings,
            tier=tier,
            state="ready",
            memory_bytes=meta.size_bytes + loaded.context_bytes,
            co_activation=tuple(entry.co_activation) if entry is not None and configured else (),
        )

    def _model_dirs(self) -> list[Path]:
        return [self.config.models_dir, *self.config.extra_models_dirs]

    async def load(self, spec: LoadSpec) -> ModelInfo:
        async with self._lock:
            return await self._load_locked(spec)

    async def _load_locked(self, spec: LoadSpec) -> ModelInfo:
        existing = self._loaded.get(spec.name)
        if existing is not None:
            old, new = self._variant(existing.spec), self._variant(spec)
            if (existing.spec.path, old) != (spec.path, new):
                raise FailedPrecondition(
                    f"model name {spec.name!r} is already loaded from {existing.spec.path}",
                    field="name",
                )
            return self._info(existing)
        started = time.perf_counter()
        path = await _blocking(functools.partial(self._model_file, spec))
        key = (path, self._variant(spec))
        weights = self._weights.get(key)
        if weights is not None:
            # Hold the shared weights, so making room cannot free them under us.
            weights.refs += 1
        try:
            meta = (
                weights.meta
                if weights
                else await _blocking(functools.partial(_read_metadata, path))
            )
            ctx_len = spec.context_length or 2048
            n_slots, slots_why = self._slots(spec, meta, ctx_len)
            n_contexts, contexts_why = _decode_contexts(spec, n_slots)
            interval, interval_why = self._stream_interval(spec)
            shares = _slot_shares(n_slots, n_contexts)
            estimate = self._estimate(meta, path, shares, ctx_len, weights is None)
            await self._make_room(spec.name, estimate)
            if weights is None:
                weights = await self._new_weights(spec, path, meta)
            context_bytes = self._estimate(meta, path, shares, ctx_len, False)
            loaded = await _blocking(
                functools.partial(
                    self._open, spec, weights, shares, ctx_len, estimate, context_bytes
                ),
                lambda made: made.close_contexts(),
            )
            if not spec.embeddings:
                # llguidance's view of the vocabulary, before the model serves: its build
                # holds the GIL for seconds (262k tokens for Gemma 3; llguidance's own part
                # never lets go of it), and while serving it slowed every decode thread of
                # the process and the event loop.
                if weights.grammars is not None:
                    await _blocking(weights.grammars.tokenizer)
                try:
                    loaded.scheduler = self._schedulers(loaded, interval)
                except BaseException:
                    loaded.close_contexts()
                    raise
        except BaseException:
            if weights is not None:
                self._drop_weights(weights)
            raise
        self._loaded[spec.name] = loaded
        elapsed = time.perf_counter() - started
        self.metrics.load_seconds.labels(spec.name).observe(elapsed)
        self.metrics.loaded.labels(spec.name).set(1)
        self.metrics.memory.labels(spec.name).set(estimate)
        threads, threads_why = self._threads(spec)
        log.info(
            "model loaded",
            extra={
                "model": spec.name,
                "path": str(path),
                "slots": n_slots,
                "slots_chosen": slots_why,
                "decode_contexts": n_contexts,
                "decode_contexts_chosen": contexts_why,
                "stream_interval_s": interval,
                "stream_interval_chosen": interval_why,
                "threads": threads,
                "threads_chosen": threads_why,
                "batch_invariant": self.config.batch_invariant,
                "repacked": self._repack(spec),
                "flash_attention": {None: "llama.cpp's choice", True: "on", False: "off"}[
                    loaded.context.params.flash_attention
                ],
                "load_s": round(elapsed, 3),
                "memory_mb": round(estimate / MB, 1),
            },
        )
        return self._info(loaded)

    def _stream_interval(self, spec: LoadSpec) -> tuple[float, str]:
        """How long a stream's tokens may wait to leave together, and why."""
        if self.config.stream_interval_s is not None:
            return self.config.stream_interval_s, "inference_local.stream_interval_s"
        if _uploads_to_gpu(spec):
            return AUTO_STREAM_INTERVAL_S, "auto on a GPU: a step takes a few milliseconds"
        return 0.0, "auto: none on a CPU, where a step takes as long as the interval"

    def _schedulers(self, loaded: _Loaded, stream_interval_s: float) -> SchedulerGroup:
        """A scheduler (and its decode thread) for each of a model's contexts."""
        name = loaded.spec.name
        loads = _ContextLoads(len(loaded.contexts))
        members: list[Scheduler] = []
        try:
            for i, context in enumerate(loaded.contexts):
                slots = context.params.n_seq
                config = SchedulerConfig(
                    name,
                    slots,
                    self.config.max_queue,
                    self.config.prefill_chunk,
                    max(self.config.n_batch, slots),
                    self.config.sample_threads or default_sample_threads(),
                    batch_prompts=not self.config.batch_invariant,
                    stall_timeout_s=self.config.stall_timeout_s,
                    max_undelivered_steps=self.config.max_undelivered_steps,
                    stream_interval_s=stream_interval_s,
                )
                metrics = _ModelMetrics(self.metrics, name, loads, i)
                members.append(
                    Scheduler(
                        config,
                        loaded.weights.model,
                        context,
                        metrics,
                        asyncio.get_running_loop(),
                        loaded.weights.grammars,
                    )
                )
        except BaseException:
            for member in members:
                member.close()
            raise
        return SchedulerGroup(members)

    def _model_file(self, spec: LoadSpec) -> Path:
        source = ensure_model_file(self._model_dirs(), spec.path, spec.package, spec.name)
        if not spec.quantization:
            return source
        target = self.config.cache_dir / f"{source.stem}.{spec.quantization.lower()}.gguf"
        if not target.is_file():
            self.config.cache_dir.mkdir(parents=True, exist_ok=True)
            partial = target.with_suffix(".partial")
            log.info(
                "quantizing",
                extra={
                    "model": spec.name,
                    "source": str(source),
                    "type": spec.quantization,
                    "state": "started",
                },
            )
            started = time.perf_counter()
            quantize(source, partial, spec.quantization, os.cpu_count() or 1)
            partial.replace(target)
            log.info(
                "quantizing",
                extra={
                    "model": spec.name,
                    "target": str(target),
                    "state": "done",
                    "seconds": round(time.perf_counter() - started, 2),
                    "size_mb": round(target.stat().st_size / MB, 1),
                },
            )
        return target

    def _slots(self, spec: LoadSpec, meta: ModelMetadata, ctx_len: int) -> tuple[int, str]:
        """Sequence slots for a model, and why: as configured, else sized from the machine."""
        if spec.parallel:
            return spec.parallel, "models[].parallel"
        if self.config.parallel:
            return self.config.parallel, "inference_local.parallel"
        per_slot = _kv_bytes(meta, ctx_len)
        fit = max(1, (self.config.memory_budget_mb * MB // 2) // per_slot)
        if fit < AUTO_SLOTS:
            return fit, (
                f"auto: {fit} slots of {ctx_len} tokens fill half the memory budget "
                f"({self.config.memory_budget_mb} MB)"
            )
        return AUTO_SLOTS, (
            f"auto: {AUTO_SLOTS}, so that as many concurrent streams batch together as a "
            "llama-server started with --parallel for them; their KV fits the memory budget"
        )

    def _flash_attention(self, model: Model, threads: int) -> bool | None:
        """As configured; unset: llama.cpp's choice (on where the backend has it, as in
        llama-server), except off on a CPU with several threads in a batch-invariant replica."""
        if self.config.flash_attention is not None:
            return self.config.flash_attention
        if self.config.batch_invariant and not model.output_on_gpu and threads > 1:
            return False
        return None

    def _repack(self, spec: LoadSpec) -> bool:
        """As the model entry says; unset: llama.cpp's repacked CPU layout (llama-server's
        default) unless the replica is batch-invariant."""
        if spec.repack_weights is not None:
            return spec.repack_weights
        return not self.config.batch_invariant

    def _variant(self, spec: LoadSpec) -> Variant:
        """What makes two loads of one file different weights."""
        return (spec.quantization or "", self._repack(spec), spec.gpu_layers)

    def _threads(self, spec: LoadSpec) -> tuple[int, str]:
        """llama.cpp threads for a model, and why."""
        if spec.n_threads:
            return spec.n_threads, "models[].n_threads"
        if self.config.n_threads:
            return self.config.n_threads, "inference_local.n_threads"
        return default_threads(), "auto: every core this process may run on"

    def _estimate(
        self, meta: ModelMetadata, path: Path, shares: list[int], ctx_len: int, new_weights: bool
    ) -> int:
        """Weights (once per file) + f16 KV for every slot + logits and activations (of each
        context)."""
        n_slots = sum(shares)
        weights = path.stat().st_size if new_weights else 0
        kv = _kv_bytes(meta, ctx_len) * n_slots
        activations = 4 * 16 * self.config.n_batch * meta.n_embd * len(shares)
        compute = 4 * meta.n_vocab * max(n_slots, 1) + activations
        return weights + kv + compute + 32 * MB * len(shares)

    async def _make_room(self, name: str, needed: int) -> None:
        budget = self.config.memory_budget_mb * MB
        while True:
            used = self._memory_used()
            count_ok = len(self._loaded) < self.config.max_loaded_models
            if count_ok and used + needed <= budget:
                return
            victim = self._lru_victim()
            if victim is None:
                if not count_ok:
                    raise ResourceExhausted(
                        f"cannot load {name!r}: {len(self._loaded)} models loaded, the maximum "
                        f"is {self.config.max_loaded_models}, and none can be unloaded",
                        retry_after_s=5,
                    )
                raise ResourceExhausted(
                    f"cannot load {name!r}: needs about {needed / MB:.0f} MiB, "
                    f"{used / MB:.0f} MiB of the {budget / MB:.0f} MiB budget is in use by "
                    f"models that cannot be unloaded",
                    retry_after_s=5,
                )
            await self._unload_locked(victim, "memory")

    def _memory_used(self) -> int:
        return sum(m.memory_bytes for m in self._loaded.values()) + sum(
            m.memory_bytes for m in self._mapped.values()
        )

    def _lru_victim(self) -> str | None:
        idle = [
            (loaded.scheduler.last_used if loaded.scheduler else 0.0, n)
            for n, loaded in self._loaded.items()
            if not loaded.spec.pinned and (loaded.scheduler is None or loaded.scheduler.busy == 0)
        ]
        return min(idle)[1] if idle else None

    def _open(
        self,
        spec: LoadSpec,
        weights: _Weights,
        shares: list[int],
        ctx_len: int,
        estimate: int,
        context_bytes: int,
    ) -> _Loaded:
        """The model's contexts, one for each share of its slots."""
        threads, _why = self._threads(spec)
        contexts: list[Context] = []
        try:
            for slots in shares:
                params = ContextParams(
                    n_seq=1 if spec.embeddings else slots,
                    n_ctx_per_seq=ctx_len,
                    n_batch=max(self.config.n_batch, slots, ctx_len if spec.embeddings else 0),
                    n_threads=threads,
                    embeddings=spec.embeddings,
                    flash_attention=self._flash_attention(weights.model, threads),
                    backend_sampling=spec.backend_sampling,
                )
                contexts.append(Context(weights.model, params))
        except BaseException:
            for context in contexts:
                context.close()
            raise
        source = weights.meta.chat_template or spec.chat_template
        template = None
        if source:
            model = weights.model
            template = ChatTemplate(
                source, model.token_text(model.bos), model.token_text(model.eos)
            )
        return _Loaded(
            spec,
            weights,
            contexts,
            None,
            template,
            estimate,
            contexts[0].n_ctx_per_seq,
            context_bytes,
        )

    async def unload(self, name: str) -> None:
        async with self._lock:
            if name not in self._loaded:
                raise NotFound(f"model {name!r} is not loaded", field="name")
            await self._unload_locked(name, "request")

    async def _unload_locked(self, name: str, reason: str) -> None:
        loaded = self._loaded.pop(name)
        try:
            if loaded.scheduler is not None:
                await _blocking(loaded.scheduler.close)
        finally:
            # Also when the unload is cancelled: the scheduler has stopped by then.
            # The context may still point at its adapters: free it first.
            loaded.close_contexts()
            for adapter, _ in loaded.adapters.values():
                adapter.close()
            self._drop_weights(loaded.weights)
        self.metrics.loaded.labels(name).set(0)
        self.metrics.memory.labels(name).set(0)
        if reason in ("memory", "keep_alive"):
            self.metrics.evictions.labels(name, reason).inc()
        mapping = self._mapped.get(name)
        if mapping is not None:
            # A standby model goes back to its mapped weights.
            self.metrics.memory.labels(name).set(mapping.memory_bytes)
        log.info(
            "model unloaded",
            extra={"model": name, "reason": reason, "state": "mapped" if mapping else "unloaded"},
        )

    def _drop_weights(self, weights: _Weights) -> None:
        weights.refs -= 1
        if weights.refs <= 0:
            self._weights.pop(weights.key, None)
            weights.model.close()

    async def _get(self, name: str) -> _Loaded:
        loaded = self._loaded.get(name)
        if loaded is not None:
            return loaded
        self._entry(name)
        started = time.perf_counter()
        async with self._lock:
            # The manifest may have been replaced while this waited for the lock.
            entry = self._entry(name)
            if name not in self._loaded:
                await self._load_locked(_spec_from_config(entry))
        self.metrics.load_wait.labels(name).observe(time.perf_counter() - started)
        return self._loaded[name]

    def _entry(self, name: str) -> ModelConfig:
        """The manifest's entry for a model this replica serves; NotFound, or for a remote one
        UNAVAILABLE (reason MODEL_REMOTE) so the Doorman takes the next tier at once."""
        entry = self._configured.get(name)
        if entry is None:
            known = sorted({*self._loaded, *(n for n, e in self._configured.items() if _local(e))})
            raise NotFound(
                f"model {name!r} is not served here (available: {', '.join(known) or 'none'})",
                field="model",
            )
        if not _local(entry):
            raise Unavailable(
                f"model {name!r} is served by a remote tier (manifest tier remote), not here",
                reason="MODEL_REMOTE",
            )
        return entry

    @property
    def weights_loaded(self) -> int:
        """Distinct model files in memory (names sharing a file count once)."""
        return len(self._weights)

    # --- the manifest ----------------------------------------------------------------------

    async def apply_manifest(
        self,
        models: list[ModelConfig],
        *,
        resident_budget_mb: int | None = None,
        standby_budget_mb: int | None = None,
        dry_run: bool = False,
        drain_timeout_s: float | None = None,
    ) -> ManifestResult:
        """Replace the manifest: validate it whole (names, files, tier budgets), then hold new
        generations back while those in flight finish, change what differs, and let the held
        ones run on the new manifest. On a drain timeout or a failed load the old one stays."""
        if self._applying.locked():
            raise Aborted("another model manifest is being applied", reason="MANIFEST_BUSY")
        async with self._applying:
            try:
                result = await self._apply(
                    models, resident_budget_mb, standby_budget_mb, dry_run, drain_timeout_s
                )
            except DeadlineExceeded:
                self.metrics.manifest_applies.labels("drain_timeout").inc()
                raise
            except (InvalidArgument, FailedPrecondition):
                self.metrics.manifest_applies.labels("refused").inc()
                raise
            except Exception:
                self.metrics.manifest_applies.labels("failed").inc()
                raise
            if not dry_run:
                self.metrics.manifest_applies.labels("applied").inc()
            return result

    async def _apply(
        self,
        models: list[ModelConfig],
        resident_budget_mb: int | None,
        standby_budget_mb: int | None,
        dry_run: bool,
        drain_timeout_s: float | None,
    ) -> ManifestResult:
        if not models:
            raise InvalidArgument(
                "a manifest names at least one model (to take one away, leave it out)",
                field="models",
            )
        try:
            check_manifest_names(models)
        except ValueError as error:
            raise InvalidArgument(str(error), field="models") from None
        budgets = Budgets(
            resident_budget_mb * MB if resident_budget_mb is not None else self._budgets.resident,
            standby_budget_mb * MB if standby_budget_mb is not None else self._budgets.standby,
            self._budgets.total,
        )
        shares = await self._shares(models, every_file=True, budgets=budgets)
        change = diff(self._configured, models)
        if dry_run:
            return ManifestResult(change, _planned(models, self.models(), shares))
        switched = asyncio.Event()
        self._switching = switched
        started = time.perf_counter()
        try:
            timeout = drain_timeout_s or self.config.manifest_drain_timeout_s
            try:
                await asyncio.wait_for(self._idle.wait(), timeout)
            except TimeoutError:
                raise DeadlineExceeded(
                    f"{self._inflight} generation(s) still running after {timeout:g} s; the "
                    "manifest in force stays",
                    reason="DRAIN_TIMEOUT",
                ) from None
            drained = time.perf_counter() - started
            async with self._lock:
                await self._switch(models, change)
            self._budgets = budgets
        finally:
            self._switching = None
            switched.set()
        log.info(
            "manifest applied",
            extra={
                "added": list(change.added),
                "removed": list(change.removed),
                "changed": list(change.changed),
                "kept": len(change.kept),
                "drain_s": round(drained, 3),
                "switch_s": round(time.perf_counter() - started - drained, 3),
            },
        )
        return ManifestResult(change, self.models(), drained)

    async def _switch(self, models: list[ModelConfig], change: Change) -> None:
        """Under the lock, nothing running: take down what goes or changes, bring up what comes
        or changes; a failure puts the old manifest back."""
        old = list(self._configured.values())
        going = [*change.removed, *change.changed]
        coming = [m for m in models if m.name in {*change.added, *change.changed}]
        await self._take_down([*going, *change.added])
        self._install(models)
        try:
            await self._bring_up(coming)
        except BaseException:
            log.exception("manifest switch failed; restoring the manifest in force")
            await self._take_down([m.name for m in coming])
            self._install(old)
            await self._bring_up([m for m in old if m.name in going])
            raise

    def _install(self, models: list[ModelConfig]) -> None:
        self._configured = {m.name: m for m in models}
        self._warms = _warms_of(models)

    async def _take_down(self, names: list[str]) -> None:
        for name in names:
            task = self._warming.pop(name, None)
            if task is not None:
                task.cancel()
            if name in self._loaded:
                await self._unload_locked(name, "manifest")
            self._unmap(name)

    async def _bring_up(self, models: list[ModelConfig]) -> None:
        """Load the resident (and preloaded) models, map the standby ones."""
        for entry in models:
            tier = entry.effective_tier
            if tier == "standby":
                await self._map(entry)
            elif tier == "resident" or (entry.tier is None and entry.preload):
                await self._load_locked(_spec_from_config(entry))

    async def _map(self, entry: ModelConfig) -> None:
        """Hold a standby model's weights in host memory without a context."""
        spec = _spec_from_config(entry)
        path = await _blocking(functools.partial(self._model_file, spec))
        size = _file_size(path)
        await _blocking(functools.partial(_prefetch, path))
        key = (path, self._variant(spec))
        weights = self._weights.get(key)
        if weights is not None:
            weights.refs += 1
            self._mapped[entry.name] = _Mapping(path, weights, 0)
        elif _uploads_to_gpu(spec):
            self._mapped[entry.name] = _Mapping(path, None, size)
        else:
            await self._make_room(entry.name, size)
            meta = await _blocking(functools.partial(_read_metadata, path))
            weights = await self._new_weights(spec, path, meta)
            self._mapped[entry.name] = _Mapping(path, weights, size)
        self.metrics.memory.labels(entry.name).set(self._mapped[entry.name].memory_bytes)
        log.info("model mapped", extra={"model": entry.name, "memory_mb": round(size / MB, 1)})

    async def _new_weights(self, spec: LoadSpec, path: Path, meta: ModelMetadata) -> _Weights:
        """Load a model file's weights, held once (refs 1) and shared by every name of them."""
        model = await _blocking(
            functools.partial(Model, path, repack=self._repack(spec), gpu_layers=spec.gpu_layers),
            Model.close,
        )
        key = (path, self._variant(spec))
        weights = _Weights(
            model,
            meta,
            key,
            refs=1,
            grammars=Grammars(
                model, mask_threads=self.config.sample_threads or default_sample_threads()
            ),
        )
        self._weights[key] = weights
        return weights

    def _unmap(self, name: str) -> None:
        mapping = self._mapped.pop(name, None)
        if mapping is None:
            return
        if mapping.weights is not None:
            self._drop_weights(mapping.weights)
        if name not in self._loaded:
            self.metrics.memory.labels(name).set(0)

    async def _shares(
        self, models: list[ModelConfig], *, every_file: bool, budgets: Budgets | None = None
    ) -> list[Share]:
        """Each resident and standby model's share of its tier, checked against the budgets;
        with every_file, every model served here must have its file too."""
        shares: list[Share] = []
        counted: dict[str, set[WeightsKey]] = {"resident": set(), "standby": set()}
        for entry in models:
            tier = entry.effective_tier
            if tier == "remote" or (tier == "on_demand" and not every_file):
                continue
            spec = _spec_from_config(entry)
            try:
                path = await _blocking(functools.partial(self._model_file, spec))
                meta = await _blocking(functools.partial(_read_metadata, path))
            except (InvalidArgument, FailedPrecondition) as error:
                message = error.message
                if not message.startswith(f"model {entry.name!r}"):
                    message = f"model {entry.name!r}: {message}"
                raise type(error)(message, field="models") from None
            except (OSError, ValueError) as error:
                raise InvalidArgument(
                    f"model {entry.name!r}: {entry.path} is not a usable GGUF: {error}",
                    field="models",
                ) from None
            if tier not in counted:
                continue
            key = (path, self._variant(spec))
            # A file counts once in the resident tier; a standby model whose file a resident
            # one holds adds nothing.
            held = key in counted[tier] or (tier == "standby" and key in counted["resident"])
            counted[tier].add(key)
            weights = 0 if held else _file_size(path)
            context = 0
            if tier == "resident":
                ctx_len = spec.context_length or 2048
                n_slots, _ = self._slots(spec, meta, ctx_len)
                shares_of = _slot_shares(n_slots, _decode_contexts(spec, n_slots)[0])
                context = self._estimate(meta, path, shares_of, ctx_len, False)
            shares.append(Share(entry.name, tier, weights, context))
        check_budgets(shares, budgets or self._budgets)
        return shares

    async def _admit(self) -> None:
        """Wait, up to manifest_wait_s, while a new manifest is being applied."""
        deadline = time.monotonic() + self.config.manifest_wait_s
        while (switching := self._switching) is not None:
            remaining = deadline - time.monotonic()
            try:
                await asyncio.wait_for(switching.wait(), max(0.0, remaining))
            except TimeoutError:
                raise Unavailable(
                    "the model manifest is being replaced; try again shortly",
                    reason="MANIFEST_SWITCHING",
                    retry_after_s=1,
                ) from None

    def _co_activate(self, router: str) -> None:
        """A request for `router` starts making ready, in the background, each specialist
        whose co_activation names it."""
        for name in self._warms.get(router, ()):
            if name in self._loaded:
                self.metrics.co_activations.labels(router, name, "ready").inc()
            elif name not in self._warming:
                task = asyncio.get_running_loop().create_task(self._warm(router, name))
                self._warming[name] = task

    async def _warm(self, router: str, name: str) -> None:
        try:
            await self._get(name)
        except asyncio.CancelledError:
            raise
        except Exception as error:
            # The specialist's own request will meet the same error and report it.
            self.metrics.co_activations.labels(router, name, "failed").inc()
            log.warning(
                "co-activation failed",
                extra={"router": router, "model": name, "error": str(error)[:200]},
            )
        else:
            self.metrics.co_activations.labels(router, name, "warmed").inc()
            log.info("co-activated", extra={"router": router, "model": name})
        finally:
            if self._warming.get(name) is asyncio.current_task():
                del self._warming[name]

    # --- generation ------------------------------------------------------------------------

    async def generate(self, request: Request) -> AsyncIterator[Event]:
        """Stream Delta events of every choice, then one End; leaving early cancels the
        sequence at once. While a new manifest is being applied this first waits for it."""
        await self._admit()
        self._inflight += 1
        self._idle.clear()
        try:
            async for event in self._generate(request):
                yield event
        finally:
            self._inflight -= 1
            if self._inflight == 0:
                self._idle.set()

    async def _generate(self, request: Request) -> AsyncIterator[Event]:
        name, adapter_name = _split_adapter(request.model, request.adapter)
        self._co_activate(name)
        loaded = await self._get(name)
        model = loaded.weights.model
        request.sampling.validate(model.n_vocab)
        if loaded.scheduler is None:
            raise FailedPrecondition(
                f"model {name!r} serves embeddings, not generation", field="model"
            )
        prompt = await self._prompt_off_loop(loaded, request)
        tokens = prompt.tokens
        if len(tokens) >= loaded.context_length:
            raise InvalidArgument(
                f"prompt is {len(tokens)} tokens but model {name!r} has a context of "
                f"{loaded.context_length} tokens (at least one must be left to generate)",
                field="messages" if request.messages is not None else "prompt",
                reason="CONTEXT_LENGTH_EXCEEDED",
            )
        adapters = await self._adapter_set(loaded, adapter_name, request.adapter_scale)
        seq = SeqRequest(
            prompt=tokens,
            sampling=request.sampling,
            adapters=adapters,
            constraint=prompt.constraint,
            n=request.n,
        )
        if self._prefix_cache is not None:
            cache = self._prefix_cache
            # A state is only valid for the weights and adapter set that computed it.
            fingerprint = await cache.fingerprint(
                loaded.weights.model.path, [(a.path, scale) for a, scale in adapters]
            )
            seq.prefix = await cache.plan(name, fingerprint, tokens)
        names = prompt.tool_names
        parsers = [ToolCallParser(names) for _ in range(request.n)] if names is not None else []
        ends: dict[int, ChoiceEnd] = {}
        prompt_tokens, served_by = len(tokens), name
        async for event in loaded.scheduler.generate(seq):
            if isinstance(event, SeqDelta):
                if not parsers:
                    yield Delta(event.text, event.logprobs, event.index)
                    continue
                text, calls = parsers[event.index].feed(event.text)
                if text or calls or event.logprobs:
                    yield Delta(text, event.logprobs, event.index, tuple(calls))
                continue
            finish = _FINISH[event.finish]
            if parsers:
                parser = parsers[event.index]
                text, calls = parser.finish()
                if text or calls:
                    yield Delta(text, (), event.index, tuple(calls))
                if parser.called and finish is Finish.STOP:
                    finish = Finish.TOOL_CALLS
            ends[event.index] = ChoiceEnd(
                event.index, finish, event.completion_tokens, event.stop_sequence
            )
            prompt_tokens, served_by = event.prompt_tokens, event.model
        choices = tuple(ends[i] for i in sorted(ends))
        yield End(
            finish=ends[0].finish,
            prompt_tokens=prompt_tokens,
            completion_tokens=sum(c.completion_tokens for c in choices),
            model=served_by,
            choices=choices,
            stop_sequence=ends[0].stop_sequence,
        )

    async def count_tokens(
        self,
        name: str,
        prompt: str | None = None,
        messages: tuple[Message, ...] | None = None,
        tools: ToolSpec | None = None,
    ) -> int:
        """Prompt tokens a generation of the same input would prefill (tools rendered)."""
        name, _ = _split_adapter(name, "")
        loaded = await self._get(name)
        if loaded.scheduler is None:
            raise FailedPrecondition(
                f"model {name!r} serves embeddings, not generation", field="model"
            )
        request = Request(name, Sampling(), prompt=prompt, messages=messages, tools=tools)
        return len((await self._prompt_off_loop(loaded, request)).tokens)

    async def _prompt_off_loop(self, loaded: _Loaded, request: Request) -> _Prompt:
        """`_prompt`, on a worker thread for a long input, so that the event loop keeps
        streaming every other sequence meanwhile."""
        work = functools.partial(self._prompt, loaded, request)
        return await self._off_loop(
            loaded.weights, work, _input_chars(request) > INLINE_INPUT_CHARS
        )

    async def _tokenize_off_loop(
        self, weights: _Weights, texts: list[str], add_special: bool
    ) -> list[list[int]]:
        """Each text's tokens; on a worker thread when they are long, as `_prompt_off_loop`."""
        model = weights.model

        def tokenize() -> list[list[int]]:
            return [model.tokenize(text, add_special=add_special) for text in texts]

        return await self._off_loop(weights, tokenize, sum(map(len, texts)) > INLINE_INPUT_CHARS)

    async def _off_loop(self, weights: _Weights, work: Callable[[], T], long: bool) -> T:
        """`work`, which reads `weights`: inline when short, else on a worker thread, with the
        weights kept in memory, whatever unloads meanwhile, until the thread is done."""
        if not long:
            return work()
        weights.refs += 1
        try:
            return await _blocking(work)
        finally:
            self._drop_weights(weights)

    def _prompt(self, loaded: _Loaded, request: Request) -> _Prompt:
        """The prompt's tokens, and the constraint and tool names of the request."""
        model = loaded.weights.model
        spec = request.tools
        if request.messages is None:
            if spec is not None:
                raise InvalidArgument("tools need chat input, not a prompt", field="tools")
            if not request.prompt:
                raise InvalidArgument("prompt must not be empty", field="prompt")
            tokens = model.tokenize(request.prompt, add_special=True)
            return _Prompt(tokens, request.constraint, None)
        if not request.messages:
            raise InvalidArgument("messages must not be empty", field="messages")
        if loaded.template is None:
            raise FailedPrecondition(f"model {loaded.spec.name!r} has no chat template")
        if spec is None:
            text = loaded.template.render(request.messages)
            return _Prompt(model.tokenize(text, add_special=False), request.constraint, None)
        parsed = tools.schemas(spec)
        text = loaded.template.render(request.messages, tools.openai_tools(spec, parsed))
        constraint = tools.constraint(spec, parsed, request.constraint)
        mode = spec.choice.mode
        names = (
            None
            if mode is tools.ChoiceMode.NONE
            else frozenset([spec.choice.function_name])
            if mode is tools.ChoiceMode.FUNCTION
            else frozenset(t.name for t in spec.tools)
        )
        return _Prompt(model.tokenize(text, add_special=False), constraint, names)

    async def _adapter_set(self, loaded: _Loaded, name: str, scale: float | None) -> AdapterSet:
        if not name:
            return ()
        if scale is not None and not (math.isfinite(scale) and -8.0 <= scale <= 8.0):
            raise InvalidArgument(
                "adapter_scale must be a finite number in [-8, 8]", field="adapter_scale"
            )
        cached = loaded.adapters.get(name)
        if cached is None:
            if self._adapters is None:
                raise NotFound(
                    f"adapter {name!r}: no adapter registry is configured", field="adapter"
                )
            # Resolved (and its checksum verified by the registry) once per load into a model.
            adapter = await self._adapters(name)
            if adapter.base_model not in ("", loaded.spec.name, loaded.weights.model.path.name):
                raise InvalidArgument(
                    f"adapter {name!r} is for base model {adapter.base_model!r}, not "
                    f"{loaded.spec.name!r}",
                    field="adapter",
                )
            lora = await _blocking(
                functools.partial(LoraAdapter, loaded.weights.model, adapter.path),
                LoraAdapter.close,
            )
            cached = loaded.adapters[name] = (lora, adapter.scale)
        lora, default_scale = cached
        return ((lora, default_scale if scale is None else scale),)

    async def tokenize(self, name: str, text: str, add_special: bool) -> list[int]:
        loaded = await self._get(name)
        return (await self._tokenize_off_loop(loaded.weights, [text], add_special))[0]

    async def detokenize(self, name: str, tokens: list[int]) -> str:
        weights = (await self._get(name)).weights
        model = weights.model
        bad = [t for t in tokens if not model.valid_token(t)]
        if bad:
            raise InvalidArgument(
                f"token ids outside the vocabulary of {name!r}: {bad[:5]}", field="tokens"
            )

        def text() -> str:
            return b"".join(model.piece(t) for t in tokens).decode("utf-8", "replace")

        return await self._off_loop(weights, text, len(tokens) > INLINE_TOKENS)

    async def embed(self, name: str, inputs: list[str]) -> tuple[list[list[float]], int]:
        loaded = await self._get(name)
        if not loaded.spec.embeddings:
            raise FailedPrecondition(
                f"model {name!r} does not serve embeddings (load it with embeddings=true)",
                field="model",
            )
        if not inputs:
            raise InvalidArgument("input must not be empty", field="inputs")
        batches = await self._tokenize_off_loop(loaded.weights, inputs, True)
        for i, tokens in enumerate(batches):
            if not tokens or len(tokens) > loaded.context_length:
                raise InvalidArgument(
                    f"input {i} is {len(tokens)} tokens; the context of {name!r} is "
                    f"{loaded.context_length}",
                    field=f"inputs[{i}]",
                )
        async with loaded.embed_lock:
            vectors = await _blocking(functools.partial(_embed_all, loaded.context, batches))
        return vectors, sum(len(t) for t in batches)


def _embed_all(context: Context, inputs: list[list[int]]) -> list[list[float]]:
    batch = Batch(max(len(t) for t in inputs))
    try:
        vectors = []
        for tokens in inputs:
            batch.clear()
            batch.add_many(tokens, 0, 0, True)
            for i in range(batch.n):
                batch.raw.logits[i] = True
            context.clear_seq(0)
            context.decode(batch)
            vectors.append(context.embedding(0))
        context.clear_seq(0)
        return vectors
    finally:
        batch.close()


def default_threads() -> int:
    """Every core this process may run on, as llama-server takes them. Between two decodes the
    OpenMP workers sleep rather than spin (inference_local/__init__.py), so the rest of the mesh
    gets those cores for its share of every token."""
    return max(1, len(os.sched_getaffinity(0)))


def _kv_bytes(meta: ModelMetadata, ctx_len: int) -> int:
    """f16 keys and values of one sequence slot of ctx_len tokens."""
    return 2 * 2 * meta.n_layer * meta.n_head_kv * meta.head_dim * ctx_len


# Slots a model gets when neither it nor inference_local sets `parallel`.
AUTO_SLOTS = 32


def default_sample_threads() -> int:
    """One sampling thread per core, at most 8: samplers only run between two decodes."""
    return min(8, os.cpu_count() or 1)


def _read_metadata(path: Path) -> ModelMetadata:
    model = Model(path, vocab_only=True)
    try:
        meta = model.metadata()
    finally:
        model.close()
    return dataclasses.replace(meta, size_bytes=meta.size_bytes or path.stat().st_size)


def _split_adapter(model: str, adapter: str) -> tuple[str, str]:
    """`base:adapter` names an adapter inline; an explicit adapter field wins."""
    base, sep, inline = model.partition(":")
    if sep and not adapter:
        return base, inline
    return (base if sep else model), adapter


def _spec_from_config(entry: ModelConfig) -> LoadSpec:
    return LoadSpec(
        name=entry.name,
        path=entry.path,
        context_length=entry.context_length,
        parallel=entry.parallel,
        quantization=entry.quantization,
        pinned=entry.effective_tier == "resident" or entry.pinned,
        embeddings=entry.embeddings,
        chat_template=entry.chat_template,
        package=entry.package,
        n_threads=entry.n_threads,
        repack_weights=entry.repack_weights,
        gpu_layers=entry.gpu_layers,
        backend_sampling=entry.backend_sampling,
        decode_contexts=entry.decode_contexts,
    )


def _slot_shares(n_slots: int, k: int) -> list[int]:
    """The slots of each of a model's k contexts (`_decode_contexts`): near-equal shares."""
    return [n_slots // k + (i < n_slots % k) for i in range(k)]


# Unset decode_contexts on a GPU: up to this many contexts, each with at least as many slots as
# a request's most choices (scheduler.MAX_N, 8), so that the split refuses no n one context would
# take. On an H100 at 16 and 64 streams four contexts made 1.8x and 2.0x one context's
# tokens/s, two 1.7x; eight were no better than four, 16 or 32 worse
# (bench/results/gpu_decode_contexts_2026-12-07-h100.md). On a CPU a second context only cost
# (0.90x and 0.97x at 4 and 16 streams): one.
AUTO_DECODE_CONTEXTS = 4
# A stream's messages at most every 20 ms on a GPU (InferenceLocalConfig.stream_interval_s):
# on an H100, against a message a step, the mesh +45% to +54% at 16 streams and +22% to +93%
# at 64 (bench/results/gpu_stream_interval_2026-12-07-h100.md).
AUTO_STREAM_INTERVAL_S = 0.02


def _decode_contexts(spec: LoadSpec, n_slots: int) -> tuple[int, str]:
    """How many llama.cpp contexts share a model's slots (at most one a slot), and why."""
    if spec.embeddings:
        return 1, "an embedding model has one"
    if spec.decode_contexts:
        return min(spec.decode_contexts, n_slots), "models[].decode_contexts"
    if not _uploads_to_gpu(spec):
        return 1, "auto: one on a CPU"
    k = max(1, min(AUTO_DECODE_CONTEXTS, n_slots // MAX_N))
    return k, (
        f"auto on a GPU: up to {AUTO_DECODE_CONTEXTS}, at least {MAX_N} slots each, so "
        "one context's step runs on the device while another's rows are sampled on the host"
    )


def _input_chars(request: Request) -> int:
    """How much text a request's prompt is made from: its prompt, or its messages and tools."""
    chars = len(request.prompt or "")
    for message in request.messages or ():
        chars += len(message.content) + sum(len(c.arguments) for c in message.tool_calls)
    if request.tools is not None:
        chars += sum(len(t.description) + len(t.parameters) for t in request.tools.tools)
    return chars


async def _blocking(work: Callable[[], T], discard: Callable[[T], None] | None = None) -> T:
    """Run llama.cpp work (a load, an allocation) in a thread. A thread cannot be stopped: when
    the caller is cancelled this waits for it to finish, so nothing it uses is freed under it,
    discards what it made, and then lets the cancellation go on."""
    task = asyncio.ensure_future(asyncio.to_thread(work))
    cancelled = False
    while not task.done():
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            cancelled = True
        except Exception:
            break
    if cancelled:
        if discard is not None and task.exception() is None:
            discard(task.result())
        raise asyncio.CancelledError
    return task.result()


def _local(entry: ModelConfig) -> bool:
    return entry.effective_tier != "remote"


def _warms_of(models: list[ModelConfig]) -> dict[str, tuple[str, ...]]:
    """For each router, the specialists whose co_activation names it."""
    warms: dict[str, list[str]] = {}
    for entry in models:
        for router in entry.co_activation:
            warms.setdefault(router, []).append(entry.name)
    return {router: tuple(names) for router, names in warms.items()}


def _planned(
    models: list[ModelConfig], current: list[ModelInfo], shares: list[Share]
) -> list[ModelInfo]:
    """What ListModels would show after a manifest, for a dry run: a kept model as it is, the
    others in the state their tier brings them up in, with their share of its budget."""
    now = {m.name: m for m in current}
    memory = {s.name: s.total for s in shares}
    planned = []
    for entry in models:
        info = now.get(entry.name)
        tier = entry.effective_tier
        if info is not None and info.tier == tier:
            planned.append(info)
            continue
        state = {"resident": "ready", "standby": "mapped"}.get(tier, "unloaded")
        if tier == "on_demand" and entry.tier is None and entry.preload:
            state = "ready"
        planned.append(
            ModelInfo(
                entry.name,
                entry.context_length,
                state == "ready",
                pinned=tier == "resident",
                embeddings=entry.embeddings,
                tier=tier,
                state=state,
                memory_bytes=memory.get(entry.name, 0),
                co_activation=tuple(entry.co_activation),
            )
        )
    return planned


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _prefetch(path: Path) -> None:
    """Ask the kernel to read a model file into the page cache, so a standby model's first
    request reads its weights from memory, not from disk."""
    with contextlib.suppress(OSError, AttributeError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        finally:
            os.close(fd)


def _uploads_to_gpu(spec: LoadSpec) -> bool:
    """Whether creating the model would put weights on a GPU (a GPU build, layers offloaded)."""
    return spec.gpu_layers != 0 and gpu_offload_supported()
