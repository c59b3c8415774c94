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

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from inference_local import tools
from inference_local.chat_template import ChatTemplate, Message
from inference_local.config import InferenceLocalConfig, ModelConfig
from inference_local.constraints import Constraint, Grammars
from inference_local.llama_api import (
    Batch,
    Context,
    ContextParams,
    LoraAdapter,
    Model,
    ModelMetadata,
    quantize,
)
from inference_local.models import ensure_model_file
from inference_local.prefix_cache import PrefixCache
from inference_local.sampling import Sampling, TokenLogprob
from inference_local.scheduler import (
    AdapterSet,
    Scheduler,
    SchedulerConfig,
    SchedulerMetrics,
    SeqRequest,
)
from inference_local.scheduler import Delta as SeqDelta
from inference_local.scheduler import Finish as SeqFinish
from inference_local.tools import ToolCallDelta, ToolCallParser, ToolSpec
from slm.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
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
    "ModelInfo",
    "Request",
]

MB = 1 << 20


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
    repack_weights: bool = False
    gpu_layers: int | None = None
    backend_sampling: bool | None = None


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


class _ModelMetrics(SchedulerMetrics):
    def __init__(self, metrics: EngineMetrics, name: str) -> None:
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
        self._running.set(running)
        self._waiting.set(waiting)
        self._kv.set(kv_used)

    def idle(self, waiting: int) -> None:
        self._running.set(0)
        self._waiting.set(waiting)
        self._kv.set(0.0)

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
class _Loaded:
    spec: LoadSpec
    weights: _Weights
    context: Context
    scheduler: Scheduler | None
    template: ChatTemplate | None
    memory_bytes: int
    context_length: int
    adapters: dict[str, tuple[LoraAdapter, float]] = field(default_factory=dict)
    embed_lock: asyncio.Lock = field(default_factory=asyncio.Lock)


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
        self._configured = {m.name: m for m in config.models}
        self._loaded: dict[str, _Loaded] = {}
        self._weights: dict[WeightsKey, _Weights] = {}
        self._lock = asyncio.Lock()
        self._reaper: asyncio.Task[None] | None = None

    # --- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        for entry in self.config.models:
            if entry.preload:
                await self.load(_spec_from_config(entry))
        if self.config.keep_alive_s > 0:
            self._reaper = asyncio.get_running_loop().create_task(self._reap())

    async def close(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
        async with self._lock:
            for name in list(self._loaded):
                await self._unload_locked(name, "shutdown")

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
            if name not in self._loaded:
                infos.append(
                    ModelInfo(
                        name,
                        entry.context_length,
                        False,
                        pinned=entry.pinned,
                        embeddings=entry.embeddings,
                    )
                )
        return infos

    def _info(self, loaded: _Loaded) -> ModelInfo:
        meta = loaded.weights.meta
        return ModelInfo(
            name=loaded.spec.name,
            context_length=loaded.context_length,
            loaded=True,
            architecture=meta.architecture,
            size_bytes=meta.size_bytes,
            has_chat_template=loaded.template is not None,
            pinned=loaded.spec.pinned,
            embeddings=loaded.spec.embeddings,
        )

    def _model_dirs(self) -> list[Path]:
        return [self.config.models_dir, *self.config.extra_models_dirs]

    async def load(self, spec: LoadSpec) -> ModelInfo:
        async with self._lock:
            return await self._load_locked(spec)

    async def _load_locked(self, spec: LoadSpec) -> ModelInfo:
        existing = self._loaded.get(spec.name)
        if existing is not None:
            if (existing.spec.path, _variant(existing.spec)) != (spec.path, _variant(spec)):
                raise FailedPrecondition(
                    f"model name {spec.name!r} is already loaded from {existing.spec.path}",
                    field="name",
                )
            return self._info(existing)
        started = time.perf_counter()
        path = await asyncio.to_thread(self._model_file, spec)
        key = (path, _variant(spec))
        weights = self._weights.get(key)
        if weights is not None:
            # Hold the shared weights, so making room cannot free them under us.
            weights.refs += 1
        try:
            meta = weights.meta if weights else await asyncio.to_thread(_read_metadata, path)
            ctx_len = spec.context_length or 2048
            n_slots, slots_why = self._slots(spec, meta, ctx_len)
            estimate = self._estimate(meta, path, n_slots, ctx_len, weights is None)
            await self._make_room(spec.name, estimate)
            if weights is None:
                model = await asyncio.to_thread(
                    functools.partial(
                        Model, path, repack=spec.repack_weights, gpu_layers=spec.gpu_layers
                    )
                )
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
            loaded = await asyncio.to_thread(self._open, spec, weights, n_slots, ctx_len, estimate)
        except BaseException:
            if weights is not None:
                self._drop_weights(weights)
            raise
        if not spec.embeddings:
            loaded.scheduler = Scheduler(
                SchedulerConfig(
                    spec.name,
                    n_slots,
                    self.config.max_queue,
                    self.config.prefill_chunk,
                    max(self.config.n_batch, n_slots),
                    self.config.sample_threads or default_sample_threads(),
                    stall_timeout_s=self.config.stall_timeout_s,
                    max_undelivered_steps=self.config.max_undelivered_steps,
                ),
                weights.model,
                loaded.context,
                _ModelMetrics(self.metrics, spec.name),
                asyncio.get_running_loop(),
                weights.grammars,
            )
        self._loaded[spec.name] = loaded
        elapsed = time.perf_counter() - started
        self.metrics.load_seconds.labels(spec.name).observe(elapsed)
        self.metrics.loaded.labels(spec.name).set(1)
        self.metrics.memory.labels(spec.name).set(estimate)
        log.info(
            "model loaded",
            extra={
                "model": spec.name,
                "path": str(path),
                "slots": n_slots,
                "slots_chosen": slots_why,
                "threads": self._threads(spec)[0],
                "threads_chosen": self._threads(spec)[1],
                "load_s": round(elapsed, 3),
                "memory_mb": round(estimate / MB, 1),
            },
        )
        return self._info(loaded)

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
        """As configured; unset: llama.cpp's choice, except off on a CPU with several threads,
        which keeps the same seed's text the same alone and batched."""
        if self.config.flash_attention is not None:
            return self.config.flash_attention
        if model.output_on_gpu or threads == 1:
            return None
        return False

    def _threads(self, spec: LoadSpec) -> tuple[int, str]:
        """llama.cpp threads for a model, and why."""
        if spec.n_threads:
            return spec.n_threads, "models[].n_threads"
        if self.config.n_threads:
            return self.config.n_threads, "inference_local.n_threads"
        return default_threads(), "auto: every core this process may run on"

    def _estimate(
        self, meta: ModelMetadata, path: Path, n_slots: int, ctx_len: int, new_weights: bool
    ) -> int:
        """Weights (once per file) + f16 KV for every slot + logits and activations."""
        weights = path.stat().st_size if new_weights else 0
        kv = _kv_bytes(meta, ctx_len) * n_slots
        compute = 4 * meta.n_vocab * max(n_slots, 1) + 4 * 16 * self.config.n_batch * meta.n_embd
        return weights + kv + compute + 32 * MB

    async def _make_room(self, name: str, needed: int) -> None:
        budget = self.config.memory_budget_mb * MB
        while True:
            used = sum(m.memory_bytes for m in self._loaded.values())
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

    def _lru_victim(self) -> str | None:
        idle = [
            (loaded.scheduler.last_used if loaded.scheduler else 0.0, n)
            for n, loaded in self._loaded.items()
            if not loaded.spec.pinned and (loaded.scheduler is None or loaded.scheduler.busy == 0)
        ]
        return min(idle)[1] if idle else None

    def _open(
        self, spec: LoadSpec, weights: _Weights, n_slots: int, ctx_len: int, estimate: int
    ) -> _Loaded:
        threads, _why = self._threads(spec)
        context = Context(
            weights.model,
            ContextParams(
                n_seq=1 if spec.embeddings else n_slots,
                n_ctx_per_seq=ctx_len,
                n_batch=max(self.config.n_batch, n_slots, ctx_len if spec.embeddings else 0),
                n_threads=threads,
                embeddings=spec.embeddings,
                flash_attention=self._flash_attention(weights.model, threads),
                backend_sampling=spec.backend_sampling,
            ),
        )
        source = weights.meta.chat_template or spec.chat_template
        template = None
        if source:
            model = weights.model
            template = ChatTemplate(
                source, model.token_text(model.bos), model.token_text(model.eos)
            )
        return _Loaded(spec, weights, context, None, template, estimate, context.n_ctx_per_seq)

    async def unload(self, name: str) -> None:
        async with self._lock:
            if name not in self._loaded:
                raise NotFound(f"model {name!r} is not loaded", field="name")
            await self._unload_locked(name, "request")

    async def _unload_locked(self, name: str, reason: str) -> None:
        loaded = self._loaded.pop(name)
        if loaded.scheduler is not None:
            await asyncio.to_thread(loaded.scheduler.close)
        # The context may still point at its adapters: free it first.
        loaded.context.close()
        for adapter, _ in loaded.adapters.values():
            adapter.close()
        self._drop_weights(loaded.weights)
        self.metrics.loaded.labels(name).set(0)
        self.metrics.memory.labels(name).set(0)
        if reason in ("memory", "keep_alive"):
            self.metrics.evictions.labels(name, reason).inc()
        log.info("model unloaded", extra={"model": name, "reason": reason})

    def _drop_weights(self, weights: _Weights) -> None:
        weights.refs -= 1
        if weights.refs <= 0:
            self._weights.pop(weights.key, None)
            weights.model.close()

    async def _get(self, name: str) -> _Loaded:
        loaded = self._loaded.get(name)
        if loaded is not None:
            return loaded
        entry = self._configured.get(name)
        if entry is None:
            known = ", ".join(sorted({*self._loaded, *self._configured})) or "none"
            raise NotFound(f"model {name!r} is not served here (available: {known})", field="model")
        started = time.perf_counter()
        async with self._lock:
            if name not in self._loaded:
                await self._load_locked(_spec_from_config(entry))
        self.metrics.load_wait.labels(name).observe(time.perf_counter() - started)
        return self._loaded[name]

    @property
    def weights_loaded(self) -> int:
        """Distinct model files in memory (names sharing a file count once)."""
        return len(self._weights)

    # --- generation ------------------------------------------------------------------------

    async def generate(self, request: Request) -> AsyncIterator[Event]:
        """Stream Delta events of every choice, then one End; leaving early cancels the
        sequence at once."""
        name, adapter_name = _split_adapter(request.model, request.adapter)
        loaded = await self._get(name)
        model = loaded.weights.model
        request.sampling.validate(model.n_vocab)
        if loaded.scheduler is None:
            raise FailedPrecondition(
                f"model {name!r} serves embeddings, not generation", field="model"
            )
        prompt = self._prompt(loaded, request)
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
        return len(self._prompt(loaded, request).tokens)

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
            lora = await asyncio.to_thread(LoraAdapter, loaded.weights.model, adapter.path)
            cached = loaded.adapters[name] = (lora, adapter.scale)
        lora, default_scale = cached
        return ((lora, default_scale if scale is None else scale),)

    async def tokenize(self, name: str, text: str, add_special: bool) -> list[int]:
        loaded = await self._get(name)
        return loaded.weights.model.tokenize(text, add_special=add_special)

    async def detokenize(self, name: str, tokens: list[int]) -> str:
        model = (await self._get(name)).weights.model
        bad = [t for t in tokens if not model.valid_token(t)]
        if bad:
            raise InvalidArgument(
                f"token ids outside the vocabulary of {name!r}: {bad[:5]}", field="tokens"
            )
        return b"".join(model.piece(t) for t in tokens).decode("utf-8", "replace")

    async def embed(self, name: str, inputs: list[str]) -> tuple[list[list[float]], int]:
        loaded = await self._get(name)
        if not loaded.spec.embeddings:
            raise FailedPrecondition(
                f"model {name!r} does not serve embeddings (load it with embeddings=true)",
                field="model",
            )
        if not inputs:
            raise InvalidArgument("input must not be empty", field="inputs")
        model = loaded.weights.model
        batches = [model.tokenize(text, add_special=True) for text in inputs]
        for i, tokens in enumerate(batches):
            if not tokens or len(tokens) > loaded.context_length:
                raise InvalidArgument(
                    f"input {i} is {len(tokens)} tokens; the context of {name!r} is "
                    f"{loaded.context_length}",
                    field=f"inputs[{i}]",
                )
        async with loaded.embed_lock:
            vectors = await asyncio.to_thread(_embed_all, loaded.context, batches)
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
        pinned=entry.pinned,
        embeddings=entry.embeddings,
        chat_template=entry.chat_template,
        package=entry.package,
        n_threads=entry.n_threads,
        repack_weights=entry.repack_weights,
        gpu_layers=entry.gpu_layers,
        backend_sampling=entry.backend_sampling,
    )


def _variant(spec: LoadSpec) -> Variant:
    return (spec.quantization or "", spec.repack_weights, spec.gpu_layers)
