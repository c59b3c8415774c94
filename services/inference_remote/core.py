"""The remote tier's core: model -> pool, attempts before the first token, runtime LoRA."""

from __future__ import annotations

import asyncio
import enum
import hashlib
import json
import logging
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol
from urllib.parse import urlsplit

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from inference_remote.pool import Pool, Upstream
from inference_remote.upstream import Chunk, ToolCallPiece, UpstreamFailure, UpstreamRejected
from slm.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unavailable,
    Unimplemented,
)

log = logging.getLogger(__name__)

# Adapter lookups are cached this long, so a busy adapter does not re-hash its artefact in the
# registry on every request; a deleted adapter stops being served within this delay.
ADAPTER_TTL_S = 10.0
# Sampling fields only vLLM-style servers accept; OpenAI's API refuses unknown fields.
EXTENSION_FIELDS = ("top_k", "min_p", "repetition_penalty")


class Finish(enum.Enum):
    STOP = "stop"
    LENGTH = "length"
    CONTENT_FILTER = "content_filter"
    TOOL_CALLS = "tool_calls"


@dataclass(frozen=True)
class Constraint:
    """What the output must be; `kind` names which of the other fields holds it."""

    kind: Literal["json_object", "json_schema", "regex", "choice", "grammar"]
    # json_schema: the schema as JSON text, the caller's name for it, and whether strict.
    schema: str = ""
    name: str = ""
    strict: bool = False
    # regex: the pattern; grammar: the source; choice: the strings.
    pattern: str = ""
    choices: tuple[str, ...] = ()


# Constraints only vLLM's `structured_outputs` can carry; OpenAI's API has no such field.
VLLM_ONLY_CONSTRAINTS = frozenset({"regex", "choice", "grammar"})


@dataclass(frozen=True)
class Tool:
    name: str
    description: str = ""
    # JSON Schema of the arguments as JSON text; "" means any object.
    parameters: str = ""
    strict: bool = False


@dataclass(frozen=True)
class ToolChoice:
    mode: Literal["none", "auto", "required", "function"]
    function_name: str = ""


@dataclass(frozen=True)
class ToolCall:
    """A complete call in the chat history."""

    id: str
    name: str
    arguments: str


@dataclass(frozen=True)
class Sampling:
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: tuple[tuple[int, float], ...] = ()
    constraint: Constraint | None = None
    n: int | None = None


@dataclass(frozen=True)
class Message:
    role: str
    content: str
    name: str = ""
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str = ""


@dataclass(frozen=True)
class Request:
    model: str
    sampling: Sampling
    prompt: str | None = None
    messages: tuple[Message, ...] | None = None
    adapter: str = ""
    adapter_scale: float | None = None
    tools: tuple[Tool, ...] = ()
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None

    def text_prefix(self, length: int) -> str:
        if self.prompt is not None:
            return self.prompt[:length]
        joined = "\n".join(f"{m.role}:{m.content}" for m in self.messages or ())
        return joined[:length]


@dataclass(frozen=True)
class Delta:
    text: str = ""
    choice_index: int = 0
    reasoning: str = ""
    tool_calls: tuple[ToolCallPiece, ...] = ()


@dataclass(frozen=True)
class ChoiceEnd:
    index: int
    finish: Finish
    completion_tokens: int
    # The stop string that ended the choice, when the upstream says (vLLM's stop_reason).
    stop_sequence: str = ""


@dataclass(frozen=True)
class End:
    finish: Finish
    prompt_tokens: int
    completion_tokens: int
    model: str
    upstream: str
    external: bool
    # Every choice's end, when more than one was asked for.
    choices: tuple[ChoiceEnd, ...] = ()
    # Choice 0's stop string, when the upstream says.
    stop_sequence: str = ""


Event = Delta | End


@dataclass(frozen=True)
class AdapterRef:
    """What the registry says about an adapter, reduced to what a remote load needs."""

    name: str
    base_model: str
    peft: bool
    sha256: str
    path: str
    store_path: str
    tiers: tuple[str, ...]


class AdapterSource(Protocol):
    async def get(self, name: str) -> AdapterRef:
        """The adapter, its checksum verified; NotFound when it is not registered."""


@dataclass(frozen=True)
class ModelPool:
    name: str
    pool: Pool
    context_length: int


class RemoteMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "slm_remote_requests",
            "Generations by outcome.",
            ["model", "outcome"],
            registry=registry,
        )
        self.attempts = Counter(
            "slm_remote_attempts",
            "Attempts sent to upstreams.",
            ["model", "upstream"],
            registry=registry,
        )
        self.upstream_errors = Counter(
            "slm_remote_upstream_errors",
            "Upstream failures, by tier and reason.",
            ["tier", "model", "upstream", "reason"],
            registry=registry,
        )
        self.outstanding = Gauge(
            "slm_remote_outstanding_requests",
            "Requests in flight to an upstream.",
            ["model", "upstream"],
            registry=registry,
        )
        self.healthy = Gauge(
            "slm_remote_upstream_healthy",
            "1 while the upstream passes its health probe.",
            ["model", "upstream"],
            registry=registry,
        )
        self.ttft = Histogram(
            "slm_remote_ttft_seconds",
            "Time from request to first token through an upstream.",
            ["model"],
            registry=registry,
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        self.tokens = Counter(
            "slm_remote_completion_tokens",
            "Completion tokens received from upstreams.",
            ["model"],
            registry=registry,
        )
        self.adapter_loads = Counter(
            "slm_remote_adapter_loads",
            "Runtime LoRA loads into upstreams, by outcome.",
            ["upstream", "outcome"],
            registry=registry,
        )


def tier_of(upstream: Upstream) -> str:
    return "external" if upstream.kind == "external" else "gpu"


def host_of(url: str) -> str:
    return (urlsplit(url).hostname or "").lower()


def _json(text: str) -> Any:
    """JSON text the caller sent; validate() has parsed it once already."""
    return json.loads(text)


def _message(m: Message) -> dict[str, Any]:
    message: dict[str, Any] = {"role": m.role, "content": m.content}
    if m.name:
        message["name"] = m.name
    if m.tool_calls:
        # OpenAI's shape: an assistant turn that only calls tools has null content.
        message["content"] = m.content or None
        message["tool_calls"] = [
            {
                "id": call.id,
                "type": "function",
                "function": {"name": call.name, "arguments": call.arguments or "{}"},
            }
            for call in m.tool_calls
        ]
    if m.tool_call_id:
        message["tool_call_id"] = m.tool_call_id
    return message


def _tools(request: Request) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    if request.tools:
        tools = []
        for tool in request.tools:
            function: dict[str, Any] = {
                "name": tool.name,
                "parameters": _json(tool.parameters) if tool.parameters else {"type": "object"},
            }
            if tool.description:
                function["description"] = tool.description
            if tool.strict:
                function["strict"] = True
            tools.append({"type": "function", "function": function})
        fields["tools"] = tools
    choice = request.tool_choice
    if choice is not None:
        fields["tool_choice"] = (
            {"type": "function", "function": {"name": choice.function_name}}
            if choice.mode == "function"
            else choice.mode
        )
    if request.parallel_tool_calls is not None:
        fields["parallel_tool_calls"] = request.parallel_tool_calls
    return fields


def _constraint(constraint: Constraint, upstream: Upstream) -> dict[str, Any]:
    if constraint.kind == "json_object":
        return {"response_format": {"type": "json_object"}}
    if constraint.kind == "json_schema":
        schema: dict[str, Any] = {
            "name": constraint.name or "output",
            "schema": _json(constraint.schema),
        }
        if constraint.strict:
            schema["strict"] = True
        return {"response_format": {"type": "json_schema", "json_schema": schema}}
    if upstream.kind != "vllm":
        # generate() never picks such an upstream; this guards the body builder on its own.
        raise InvalidArgument(
            f"a {constraint.kind} constraint needs a vLLM upstream", field="sampling.constraint"
        )
    value: Any = list(constraint.choices) if constraint.kind == "choice" else constraint.pattern
    return {"structured_outputs": {constraint.kind: value}}


def request_body(request: Request, upstream: Upstream, model: str) -> tuple[str, dict[str, Any]]:
    """The OpenAI path and JSON body of one attempt."""
    body: dict[str, Any] = {"model": model, "stream": True}
    # vLLM and OpenAI send usage in a last chunk when asked; others ignore the option.
    body["stream_options"] = {"include_usage": True}
    s = request.sampling
    fields: dict[str, Any] = {
        "max_tokens": s.max_tokens,
        "temperature": s.temperature,
        "top_p": s.top_p,
        "seed": s.seed,
        "presence_penalty": s.presence_penalty,
        "frequency_penalty": s.frequency_penalty,
        "n": s.n,
    }
    if upstream.kind != "external":
        fields.update(top_k=s.top_k, min_p=s.min_p, repetition_penalty=s.repetition_penalty)
    body.update({k: v for k, v in fields.items() if v is not None})
    if s.stop:
        body["stop"] = list(s.stop)
    if s.logit_bias:
        body["logit_bias"] = {str(token): bias for token, bias in s.logit_bias}
    if s.constraint is not None:
        body.update(_constraint(s.constraint, upstream))
    if request.prompt is not None:
        body["prompt"] = request.prompt
        return "/completions", body
    body["messages"] = [_message(m) for m in request.messages or ()]
    body.update(_tools(request))
    return "/chat/completions", body


def _check_json(text: str, field: str, what: str) -> None:
    try:
        parsed = json.loads(text)
    except ValueError as error:
        raise InvalidArgument(f"{what} is not valid JSON: {error}", field=field) from None
    if not isinstance(parsed, dict):
        raise InvalidArgument(f"{what} must be a JSON object", field=field)


def validate(request: Request) -> None:
    if not request.model:
        raise InvalidArgument("model is required", field="model")
    if request.prompt is None and request.messages is None:
        raise InvalidArgument("one of prompt or chat is required", field="input")
    if request.prompt is not None and not request.prompt:
        raise InvalidArgument("prompt must not be empty", field="prompt")
    if request.messages is not None and not request.messages:
        raise InvalidArgument("messages must not be empty", field="messages")
    s = request.sampling
    if s.max_tokens is not None and s.max_tokens < 1:
        raise InvalidArgument("max_tokens must be at least 1", field="sampling.max_tokens")
    if s.temperature is not None and not 0.0 <= s.temperature <= 2.0:
        raise InvalidArgument("temperature must be in [0, 2]", field="sampling.temperature")
    if s.top_p is not None and not 0.0 < s.top_p <= 1.0:
        raise InvalidArgument("top_p must be in (0, 1]", field="sampling.top_p")
    if s.n is not None and s.n < 1:
        raise InvalidArgument("n must be at least 1", field="sampling.n")
    if request.adapter_scale is not None and request.adapter_scale != 1.0:
        # vLLM applies a LoRA at its trained scale; there is no per-request scale to pass on.
        raise InvalidArgument(
            "adapter_scale other than 1.0 is not supported by remote upstreams",
            field="adapter_scale",
        )
    constraint = s.constraint
    if constraint is not None and constraint.kind == "json_schema":
        _check_json(constraint.schema, "sampling.constraint.json_schema.schema", "the schema")
    if constraint is not None and constraint.kind == "choice" and not constraint.choices:
        raise InvalidArgument(
            "a choice constraint needs at least one choice", field="sampling.constraint.choice"
        )
    _validate_tools(request)


def _validate_tools(request: Request) -> None:
    if not request.tools and request.tool_choice is None and request.parallel_tool_calls is None:
        return
    if request.prompt is not None:
        raise InvalidArgument("tools need chat input, not a raw prompt", field="tools")
    names = set()
    for i, tool in enumerate(request.tools):
        if not tool.name:
            raise InvalidArgument("a tool needs a name", field=f"tools.tools[{i}].name")
        if tool.name in names:
            raise InvalidArgument(
                f"tool {tool.name!r} is defined twice", field=f"tools.tools[{i}].name"
            )
        names.add(tool.name)
        if tool.parameters:
            _check_json(tool.parameters, f"tools.tools[{i}].parameters", "the parameters")
    choice = request.tool_choice
    if choice is not None and choice.mode in ("required", "function") and not request.tools:
        raise InvalidArgument(
            f"tool choice {choice.mode!r} needs at least one tool", field="tools.choice"
        )
    if choice is not None and choice.mode == "function" and choice.function_name not in names:
        raise InvalidArgument(
            f"tool choice names {choice.function_name!r}, which is not among the tools",
            field="tools.choice.function_name",
        )


FINISH = {
    "stop": Finish.STOP,
    "length": Finish.LENGTH,
    "content_filter": Finish.CONTENT_FILTER,
    "tool_calls": Finish.TOOL_CALLS,
    # OpenAI's older name for the same thing.
    "function_call": Finish.TOOL_CALLS,
}


class RemoteInference:
    """Generations through pools of OpenAI-compatible upstreams; no transport of its own."""

    def __init__(
        self,
        models: Sequence[ModelPool],
        metrics: RemoteMetrics,
        *,
        external_allowlist: Sequence[str],
        max_attempts: int,
        queue_timeout_s: float,
        prefix_affinity_chars: int,
        adapters: AdapterSource | None = None,
    ) -> None:
        self._models: Mapping[str, ModelPool] = {m.name: m for m in models}
        self.metrics = metrics
        self._max_attempts = max_attempts
        self._queue_timeout_s = queue_timeout_s
        self._affinity_chars = prefix_affinity_chars
        self._adapters = adapters
        self._adapter_cache: dict[str, tuple[float, AdapterRef]] = {}
        allowed = {h.lower() for h in external_allowlist}
        for model in models:
            for upstream in model.pool.upstreams:
                # The config refuses these already; the core refuses them again on its own.
                if upstream.kind == "external" and host_of(upstream.client.base_url) not in allowed:
                    raise PermissionDenied(
                        f"external upstream {upstream.name!r} is not on the allowlist"
                    )

    def models(self) -> list[ModelPool]:
        return list(self._models.values())

    def pools(self) -> list[Pool]:
        return [m.pool for m in self._models.values()]

    def _resolve(self, request: Request) -> tuple[ModelPool, str]:
        entry = self._models.get(request.model)
        if entry is not None:
            return entry, request.adapter
        # "base:adapter" names an adapter of a served base model.
        base, sep, adapter = request.model.rpartition(":")
        if sep and base in self._models and adapter:
            if request.adapter and request.adapter != adapter:
                raise InvalidArgument(
                    "the model names one adapter and the adapter field another", field="adapter"
                )
            return self._models[base], adapter
        raise NotFound(f"model {request.model!r} is not served by inference-remote", field="model")

    async def _adapter(self, name: str, base_model: str) -> AdapterRef:
        if self._adapters is None:
            raise FailedPrecondition("inference-remote has no adapter registry configured")
        cached = self._adapter_cache.get(name)
        now = time.monotonic()
        if cached is not None and now - cached[0] < ADAPTER_TTL_S:
            ref = cached[1]
        else:
            ref = await self._adapters.get(name)
            self._adapter_cache[name] = (now, ref)
        if ref.base_model != base_model:
            raise InvalidArgument(
                f"adapter {name!r} is for model {ref.base_model!r}, not {base_model!r}",
                field="adapter",
            )
        if not ref.peft:
            raise FailedPrecondition(
                f"adapter {name!r} is a GGUF adapter; vLLM upstreams load PEFT adapters"
            )
        if ref.tiers and "gpu" not in ref.tiers:
            raise FailedPrecondition(f"adapter {name!r} is not registered for tier gpu")
        return ref

    async def _ensure_adapter(self, upstream: Upstream, ref: AdapterRef) -> None:
        """Load the adapter into the upstream on its first use there (vLLM runtime LoRA)."""
        if upstream.adapters.get(ref.name) == ref.sha256:
            return
        lock = upstream.adapter_locks.setdefault(ref.name, asyncio.Lock())
        async with lock:
            if upstream.adapters.get(ref.name) == ref.sha256:
                return
            if ref.name in upstream.adapters:
                # Re-registered under the same name with other weights: replace it.
                await upstream.client.unload_lora_adapter(ref.name)
                del upstream.adapters[ref.name]
            path = ref.path
            if upstream.adapter_mount:
                path = f"{upstream.adapter_mount.rstrip('/')}/{ref.store_path}"
            try:
                await upstream.client.load_lora_adapter(ref.name, path)
            except UpstreamFailure:
                self.metrics.adapter_loads.labels(upstream.name, "error").inc()
                raise
            self.metrics.adapter_loads.labels(upstream.name, "loaded").inc()
            upstream.adapters[ref.name] = ref.sha256

    def affinity_key(self, request: Request, adapter: str) -> bytes | None:
        """Requests with equal keys go to the same upstream while it is healthy."""
        prefix = ""
        if self._affinity_chars:
            text = request.text_prefix(self._affinity_chars)
            if len(text) >= self._affinity_chars:
                prefix = text
        if not prefix and not adapter:
            return None
        return hashlib.sha256(f"{adapter}\0{prefix}".encode()).digest()

    async def count_tokens(self, request: Request) -> int:
        """The prompt's tokens as a vLLM upstream of the model counts them (its /tokenize).

        Other upstreams have no counting endpoint: Unimplemented, so a caller can tell "cannot
        count here" from a failure.
        """
        validate(request)
        entry, adapter_name = self._resolve(request)
        pool = entry.pool
        if not any(u.kind == "vllm" for u in pool.upstreams):
            raise Unimplemented(
                f"model {entry.name!r} has no vLLM upstream, and other OpenAI-compatible "
                "upstreams have no token counting endpoint"
            )
        key = self.affinity_key(request, adapter_name)
        tried: set[str] = set()
        last: UpstreamFailure | None = None
        for _ in range(self._max_attempts):
            try:
                upstream = await pool.acquire(
                    key, tried, lambda u: u.kind == "vllm", self._queue_timeout_s
                )
            except Unavailable:
                break
            tried.add(upstream.name)
            try:
                _, body = request_body(request, upstream, upstream.model)
                count_body: dict[str, Any] = {
                    k: body[k] for k in ("model", "prompt", "messages", "tools") if k in body
                }
                if "messages" in count_body:
                    # The count a generation would see: the assistant's turn opened.
                    count_body["add_generation_prompt"] = True
                return await upstream.client.tokenize_count(count_body)
            except UpstreamRejected as error:
                raise InvalidArgument(
                    f"upstream {upstream.name} refused: {error.message}"
                ) from error
            except UpstreamFailure as failure:
                if failure.unhealthy:
                    await pool.mark(upstream, False)
                last = failure
            finally:
                await pool.release(upstream)
        detail = f": {last.message}" if last else ""
        raise Unavailable(
            f"no vLLM upstream of model {entry.name!r} could count the tokens{detail}",
            retry_after_s=1.0,
        )

    async def generate(self, request: Request) -> AsyncIterator[Event]:
        """Stream one generation; attempts move to another upstream only before the first token.

        After the first token, a failing upstream ends the stream with UNAVAILABLE: the text
        already sent cannot be taken back, so it is not silently continued elsewhere.
        """
        validate(request)
        entry, adapter_name = self._resolve(request)
        pool = entry.pool
        ref = await self._adapter(adapter_name, entry.name) if adapter_name else None

        constraint = request.sampling.constraint
        vllm_only = constraint is not None and constraint.kind in VLLM_ONLY_CONSTRAINTS

        def eligible(u: Upstream) -> bool:
            return (ref is None and not vllm_only) or u.kind == "vllm"

        if ref is not None and not any(u.kind == "vllm" for u in pool.upstreams):
            raise FailedPrecondition(
                f"model {entry.name!r} has no vLLM upstream to load adapter {ref.name!r}"
            )
        if vllm_only and not any(u.kind == "vllm" for u in pool.upstreams):
            assert constraint is not None
            # OpenAI's API, and so every external upstream, has no field that carries these.
            raise InvalidArgument(
                f"a {constraint.kind} constraint needs a vLLM upstream, and model "
                f"{entry.name!r} has none",
                field="sampling.constraint",
            )
        key = self.affinity_key(request, adapter_name)
        tried: set[str] = set()
        last: UpstreamFailure | None = None
        started = time.perf_counter()
        for _ in range(self._max_attempts):
            try:
                upstream = await pool.acquire(key, tried, eligible, self._queue_timeout_s)
            except Unavailable:
                break
            tried.add(upstream.name)
            labels = (entry.name, upstream.name)
            self.metrics.outstanding.labels(*labels).inc()
            self.metrics.attempts.labels(*labels).inc()
            sent_text = False
            try:
                if ref is not None:
                    await self._ensure_adapter(upstream, ref)
                model = ref.name if ref is not None else upstream.model
                path, body = request_body(request, upstream, model)
                usage = Chunk()
                # Per choice: content events (a token each, as vLLM streams) and its finish.
                events: dict[int, int] = {}
                finishes: dict[int, str] = {}
                stops: dict[int, str] = {}
                async for chunk in upstream.client.stream(path, body):
                    if chunk.prompt_tokens is not None:
                        usage = chunk
                    for choice in chunk.choices:
                        if choice.finish_reason:
                            finishes[choice.index] = choice.finish_reason
                        if choice.stop_sequence:
                            stops[choice.index] = choice.stop_sequence
                        if not choice.has_content:
                            continue
                        if not sent_text:
                            self.metrics.ttft.labels(entry.name).observe(
                                time.perf_counter() - started
                            )
                        sent_text = True
                        events[choice.index] = events.get(choice.index, 0) + 1
                        yield Delta(
                            text=choice.text,
                            choice_index=choice.index,
                            reasoning=choice.reasoning,
                            tool_calls=choice.tool_calls,
                        )
                # Servers that report no usage (llama.cpp's) stream one token per chunk.
                completion = usage.completion_tokens
                completion = sum(events.values()) if completion is None else completion
                self.metrics.tokens.labels(entry.name).inc(completion)
                self.metrics.requests.labels(entry.name, "ok").inc()
                n = request.sampling.n or 1
                ends = tuple(
                    ChoiceEnd(
                        index,
                        FINISH.get(finishes.get(index) or "stop", Finish.STOP),
                        events.get(index, 0),
                        stops.get(index, ""),
                    )
                    for index in range(n)
                )
                yield End(
                    finish=ends[0].finish,
                    prompt_tokens=usage.prompt_tokens or 0,
                    completion_tokens=completion,
                    model=request.model,
                    upstream=upstream.name,
                    external=upstream.kind == "external",
                    choices=ends if n > 1 else (),
                    stop_sequence=ends[0].stop_sequence,
                )
                return
            except UpstreamRejected as error:
                self.metrics.requests.labels(entry.name, "rejected").inc()
                raise InvalidArgument(
                    f"upstream {upstream.name} refused: {error.message}"
                ) from error
            except UpstreamFailure as failure:
                self.metrics.upstream_errors.labels(
                    tier_of(upstream), entry.name, upstream.name, failure.reason
                ).inc()
                log.warning(
                    "upstream failed",
                    extra={
                        "model": entry.name,
                        "upstream": upstream.name,
                        "reason": failure.reason,
                        "after_first_token": sent_text,
                    },
                )
                if failure.unhealthy:
                    await pool.mark(upstream, False)
                if sent_text:
                    self.metrics.requests.labels(entry.name, "broken").inc()
                    raise Unavailable(
                        f"upstream {upstream.name} failed after the stream started: "
                        f"{failure.message}",
                        reason="UPSTREAM_BROKEN",
                    ) from failure
                last = failure
            finally:
                self.metrics.outstanding.labels(*labels).dec()
                await pool.release(upstream)
        self.metrics.requests.labels(entry.name, "unavailable").inc()
        detail = f": last error from {sorted(tried)}: {last.message}" if last else ""
        raise Unavailable(
            f"no upstream of model {entry.name!r} could serve the request{detail}",
            retry_after_s=1.0,
        )
