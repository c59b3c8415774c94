"""The llama.cpp engine: loaded models and token streaming, with plain Python types.

Each model has one llama.cpp context driven by one worker thread, so the asyncio loop never
blocks on decoding. Requests beyond the running one wait in a bounded queue.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import os
import random
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from inference_local.chat_template import ChatTemplate, Message
from slm.errors import FailedPrecondition, Internal, InvalidArgument, NotFound, ResourceExhausted

log = logging.getLogger(__name__)

DEFAULT_TEMPERATURE = 0.8
DEFAULT_TOP_P = 0.95


class Finish(enum.Enum):
    STOP = "stop"
    LENGTH = "length"
    CANCELLED = "cancelled"


@dataclass(frozen=True)
class Sampling:
    max_tokens: int | None = None
    temperature: float = DEFAULT_TEMPERATURE
    top_p: float = DEFAULT_TOP_P
    stop: tuple[str, ...] = ()
    seed: int | None = None

    def validate(self) -> None:
        if self.max_tokens is not None and self.max_tokens < 1:
            raise InvalidArgument("max_tokens must be at least 1", field="sampling.max_tokens")
        if not 0.0 <= self.temperature <= 2.0:
            raise InvalidArgument("temperature must be in [0, 2]", field="sampling.temperature")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidArgument("top_p must be in (0, 1]", field="sampling.top_p")
        if len(self.stop) > 16 or any(not s for s in self.stop):
            raise InvalidArgument("stop takes at most 16 non-empty strings", field="sampling.stop")


@dataclass(frozen=True)
class Request:
    model: str
    sampling: Sampling
    prompt: str | None = None
    messages: tuple[Message, ...] | None = None


@dataclass(frozen=True)
class Delta:
    text: str


@dataclass(frozen=True)
class End:
    finish: Finish
    prompt_tokens: int
    completion_tokens: int
    model: str


Event = Delta | End


@dataclass(frozen=True)
class ModelSpec:
    name: str
    path: Path
    context_length: int
    chat_template: str | None = None
    n_threads: int | None = None


@dataclass(frozen=True)
class ModelInfo:
    name: str
    context_length: int
    loaded: bool


class EngineMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.tokens = Counter(
            "slm_engine_generated_tokens",
            "Tokens sampled by the engine.",
            ["model"],
            registry=registry,
        )
        self.prompt_tokens = Counter(
            "slm_engine_prompt_tokens", "Prompt tokens submitted.", ["model"], registry=registry
        )
        self.requests = Counter(
            "slm_engine_requests",
            "Generations finished, by reason.",
            ["model", "finish_reason"],
            registry=registry,
        )
        self.running = Gauge(
            "slm_engine_running_sequences",
            "Sequences being decoded.",
            ["model"],
            registry=registry,
        )
        self.waiting = Gauge(
            "slm_engine_waiting_requests",
            "Requests queued for the engine.",
            ["model"],
            registry=registry,
        )
        self.ttft = Histogram(
            "slm_engine_ttft_seconds",
            "Time from request to first token in the engine.",
            ["model"],
            registry=registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )
        self.load_seconds = Gauge(
            "slm_engine_model_load_seconds",
            "Time taken to load a model.",
            ["model"],
            registry=registry,
        )
        self.loaded = Gauge(
            "slm_engine_model_loaded",
            "1 when the model is in memory.",
            ["model"],
            registry=registry,
        )


class _LoadedModel:
    """One llama.cpp context and the single thread allowed to touch it."""

    def __init__(self, spec: ModelSpec, llama: Any, max_queue: int) -> None:
        self.spec = spec
        self.llama = llama
        self.context_length = int(llama.n_ctx())
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"llama-{spec.name}")
        self.slot = asyncio.Semaphore(1)
        self.waiting = 0
        self.max_queue = max_queue
        template = spec.chat_template
        gguf_template = llama.metadata.get("tokenizer.chat_template")
        if gguf_template:
            template = gguf_template
        self.template: ChatTemplate | None = None
        if template:
            self.template = ChatTemplate(
                template,
                bos_token=self._token_text(llama.token_bos()),
                eos_token=self._token_text(llama.token_eos()),
            )

    def _token_text(self, token: int) -> str:
        if token < 0:
            return ""
        return bytes(self.llama.detokenize([token], special=True)).decode("utf-8", "replace")

    def tokenize(self, request: Request) -> list[int]:
        if request.messages is not None:
            if not request.messages:
                raise InvalidArgument("messages must not be empty", field="messages")
            if self.template is None:
                raise FailedPrecondition(f"model {self.spec.name!r} has no chat template")
            text = self.template.render(request.messages)
            # The template already starts with the BOS token.
            return list(self.llama.tokenize(text.encode(), add_bos=False, special=True))
        if not request.prompt:
            raise InvalidArgument("prompt must not be empty", field="prompt")
        return list(self.llama.tokenize(request.prompt.encode(), add_bos=True, special=True))


class Engine:
    """Loads models and streams generations; the transport-free core of inference-local."""

    def __init__(self, registry: CollectorRegistry, max_queue: int = 64) -> None:
        self._models: dict[str, _LoadedModel] = {}
        self._max_queue = max_queue
        self.metrics = EngineMetrics(registry)

    async def load(self, spec: ModelSpec) -> None:
        start = time.perf_counter()
        llama = await asyncio.to_thread(_open_llama, spec)
        self._models[spec.name] = _LoadedModel(spec, llama, self._max_queue)
        elapsed = time.perf_counter() - start
        self.metrics.load_seconds.labels(spec.name).set(elapsed)
        self.metrics.loaded.labels(spec.name).set(1)
        log.info("model loaded", extra={"model": spec.name, "load_s": round(elapsed, 3)})

    async def close(self) -> None:
        for model in self._models.values():
            model.executor.shutdown(wait=True)
            model.llama.close()
            self.metrics.loaded.labels(model.spec.name).set(0)
        self._models.clear()

    def models(self) -> list[ModelInfo]:
        return [ModelInfo(m.spec.name, m.context_length, True) for m in self._models.values()]

    def _model(self, name: str) -> _LoadedModel:
        model = self._models.get(name)
        if model is None:
            known = ", ".join(sorted(self._models)) or "none"
            raise NotFound(f"model {name!r} is not served here (available: {known})", field="model")
        return model

    async def generate(self, request: Request) -> AsyncIterator[Event]:
        """Stream Delta events, then one End. Cancelling the consumer stops decoding at once."""
        request.sampling.validate()
        model = self._model(request.model)
        tokens = model.tokenize(request)
        if len(tokens) >= model.context_length:
            raise InvalidArgument(
                f"prompt is {len(tokens)} tokens but model {model.spec.name!r} has a context of "
                f"{model.context_length} tokens (at least one must be left to generate)",
                field="messages" if request.messages is not None else "prompt",
                reason="CONTEXT_LENGTH_EXCEEDED",
            )
        if model.slot.locked() and model.waiting >= model.max_queue:
            raise ResourceExhausted(
                f"model {model.spec.name!r}: {model.waiting} requests already waiting",
                retry_after_s=1.0,
            )
        labels = model.spec.name
        model.waiting += 1
        self.metrics.waiting.labels(labels).inc()
        try:
            await model.slot.acquire()
        finally:
            model.waiting -= 1
            self.metrics.waiting.labels(labels).dec()
        run = _Run(model, tokens, request.sampling, asyncio.get_running_loop(), self.metrics)
        future = asyncio.get_running_loop().run_in_executor(model.executor, run.work)
        # The slot frees only when the thread is done with the context, even if we are cancelled.
        future.add_done_callback(lambda _: model.slot.release())
        self.metrics.running.labels(labels).inc()
        started = time.perf_counter()
        first = True
        finished = False
        try:
            while True:
                item = await run.queue.get()
                if isinstance(item, Delta):
                    if first:
                        self.metrics.ttft.labels(labels).observe(time.perf_counter() - started)
                        first = False
                    yield item
                elif isinstance(item, End):
                    finished = True
                    self.metrics.requests.labels(labels, item.finish.value).inc()
                    yield item
                    return
                else:
                    finished = True
                    self.metrics.requests.labels(labels, "error").inc()
                    raise Internal("generation failed") from item
        finally:
            run.cancel.set()
            if not finished:
                self.metrics.requests.labels(labels, Finish.CANCELLED.value).inc()
            self.metrics.running.labels(labels).dec()


def _open_llama(spec: ModelSpec) -> Any:
    from llama_cpp import Llama

    return Llama(
        model_path=str(spec.path),
        n_ctx=spec.context_length,
        n_threads=spec.n_threads or os.cpu_count() or 1,
        n_batch=512,
        verbose=False,
    )


@dataclass
class _Run:
    """One generation on the worker thread; hands events to the loop through a queue."""

    model: _LoadedModel
    tokens: list[int]
    sampling: Sampling
    loop: asyncio.AbstractEventLoop
    metrics: EngineMetrics
    queue: asyncio.Queue[Event | BaseException] = field(default_factory=asyncio.Queue)
    cancel: threading.Event = field(default_factory=threading.Event)
    generated: int = 0

    def _put(self, item: Event | BaseException) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)

    def _should_stop(self, _ids: Any, _logits: Any) -> bool:
        # Called by llama-cpp-python once per sampled token: count it, and stop if cancelled.
        self.generated += 1
        self.metrics.tokens.labels(self.model.spec.name).inc()
        return self.cancel.is_set()

    def work(self) -> None:
        from llama_cpp import StoppingCriteriaList

        name = self.model.spec.name
        prompt_tokens = len(self.tokens)
        self.metrics.prompt_tokens.labels(name).inc(prompt_tokens)
        room = self.model.context_length - prompt_tokens
        max_tokens = min(self.sampling.max_tokens or room, room)
        seed = self.sampling.seed if self.sampling.seed is not None else random.getrandbits(31)
        finish = Finish.STOP
        # Prefill the whole prompt every time: reusing a cached prefix changes the shape of the
        # prefill batches, hence the logits, and the same seed would no longer give the same text.
        self.model.llama.reset()
        try:
            stream = self.model.llama.create_completion(
                self.tokens,
                max_tokens=max_tokens,
                temperature=self.sampling.temperature,
                top_p=self.sampling.top_p,
                stop=list(self.sampling.stop) or None,
                seed=seed,
                repeat_penalty=1.0,
                stream=True,
                stopping_criteria=StoppingCriteriaList([self._should_stop]),
            )
            for chunk in stream:
                choice = chunk["choices"][0]
                if choice["text"]:
                    self._put(Delta(choice["text"]))
                if choice["finish_reason"] == "length":
                    finish = Finish.LENGTH
            if self.cancel.is_set():
                finish = Finish.CANCELLED
            # llama-cpp-python samples one token past max_tokens before it stops; never bill it.
            self._put(End(finish, prompt_tokens, min(self.generated, max_tokens), name))
        except Exception as error:
            log.exception("generation failed", extra={"model": name})
            self._put(error)
