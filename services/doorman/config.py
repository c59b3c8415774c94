"""The Doorman's configuration section: routes, tenants, privacy, safety and limits."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from slm.config import LOOPBACK, Section, ServiceEndpoint, host_of

# Tiers as they are written in the config file; the Doorman maps them to slm.v1.Tier.
TierName = Literal["local", "gpu", "external"]


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
    # A pool that may be scaled to zero (the chart's vLLM pools with scaleToZero): while it is
    # absent (UNAVAILABLE), keep trying it this long, with backoff, before the next tier. Its
    # demand (slm_doorman_tier_demand) is what scales it back up. 0: the usual retries.
    cold_start_wait_s: float = Field(default=0.0, ge=0)


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
    def _names_once(self) -> RoutingConfig:
        """A model routed twice, or an alias given twice, would lose one entry in silence."""
        for kind, names in (
            ("route for model", [r.model for r in self.routes]),
            ("manifest alias", [m.alias for m in self.manifests]),
        ):
            twice = sorted({n for n in names if names.count(n) > 1})
            if twice:
                raise ValueError(
                    f"doorman.routing: {kind} {', '.join(map(repr, twice))} is given twice"
                )
        return self

    @model_validator(mode="after")
    def _external_hosts_allowed(self) -> RoutingConfig:
        allowed = {host.lower() for host in self.external_allowlist}
        for route in self.routes:
            for step in route.chain:
                if step.tier == "external" and host_of(step.upstream) not in allowed:
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
    # Requests and tokens per minute; 0 means unlimited. Shared by every Doorman replica
    # through limits.backend = "redis" (required for them when `slm up` runs several).
    rpm: int = Field(default=0, ge=0)
    tpm: int = Field(default=0, ge=0)
    # Requests running at once, counted by each Doorman replica on its own.
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
    """A bounded priority queue in front of one tier, in each Doorman replica."""

    tier: TierName
    max_concurrent: int = Field(ge=1)
    # Requests waiting beyond this many are refused at once (RESOURCE_EXHAUSTED).
    max_queue: int = Field(default=0, ge=0)


class LimitsConfig(Section):
    # Where rate-limit buckets live: this process, or Redis shared by every replica.
    backend: Literal["memory", "redis"] = "memory"
    redis_url: str = "redis://127.0.0.1:6379/0"
    tier_queues: list[TierQueueConfig] = []


class CacheConfig(Section):
    """The result cache: whole answers of deterministic requests (temperature 0, or a seed)."""

    enabled: bool = True
    # How long an answer is served from the cache after it was kept.
    ttl_s: float = Field(default=600.0, gt=0)
    # Where answers live: this process, or Redis shared by every replica.
    backend: Literal["memory", "redis"] = "memory"
    redis_url: str = "redis://127.0.0.1:6379/0"
    # Bounds of the memory backend, least recently used out first. In Redis, the server's
    # maxmemory and eviction policy bound the cache, so these may not be set with it.
    max_entries: int = Field(default=10_000, ge=1)
    max_bytes: int = Field(default=64 * 2**20, ge=1)
    # Answers larger than this (serialised) are not kept, with either backend.
    max_entry_bytes: int = Field(default=2**20, ge=1)

    @model_validator(mode="after")
    def _bounds_of_the_backend(self) -> CacheConfig:
        if self.backend == "redis":
            given = sorted({"max_entries", "max_bytes"} & self.model_fields_set)
            if given:
                raise ValueError(
                    f"doorman.cache: {', '.join(given)} bound only the memory backend; with "
                    "redis, bound the cache with the server's maxmemory and an eviction policy"
                )
        return self


class DoormanConfig(Section):
    endpoint: ServiceEndpoint = ServiceEndpoint(port=50051, metrics_port=9151)
    # Address of InferenceService (tier A) and LedgerService.
    inference_local: str = f"{LOOPBACK}:50052"
    ledger: str = f"{LOOPBACK}:50056"
    # Upper bound on any upstream call when the caller set no deadline.
    default_timeout_s: float = Field(default=600.0, gt=0)
    # While the ledger cannot be reached: "fail_closed" refuses new requests (UNAVAILABLE);
    # "spool" keeps serving. In both modes the records of requests already running go to
    # ledger_spool (fsync'd) before their final event, and are replayed in order once the
    # ledger is back.
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
    cache: CacheConfig = CacheConfig()

    @property
    def auth_enabled(self) -> bool:
        return self.auth_required if self.auth_required is not None else bool(self.tenants)

    def for_replica(self, index: int) -> DoormanConfig:
        """The section as replica `index` of `slm up` runs it: a spool of its own, so that no
        two replicas append to, or replay, one file. Replica 0 keeps the configured path, which
        a restart of the same replica finds again."""
        if index == 0:
            return self
        spool = self.ledger_spool.with_name(f"{self.ledger_spool.name}.replica-{index}")
        return self.model_copy(update={"ledger_spool": spool})

    @model_validator(mode="after")
    def _auth_off_only_on_loopback(self) -> DoormanConfig:
        loopback = host_of(self.endpoint.host) in ("127.0.0.1", "::1", "localhost")
        if not self.auth_enabled and not loopback:
            raise ValueError(
                "doorman: authentication may be off only while it listens on loopback; "
                "configure doorman.tenants or bind endpoint.host to 127.0.0.1"
            )
        if self.auth_required and not self.tenants:
            raise ValueError("doorman.auth_required is true but no doorman.tenants are configured")
        return self

    @model_validator(mode="after")
    def _rates_shared_by_replicas(self) -> DoormanConfig:
        rated = [t.name for t in self.tenants if t.rpm or t.tpm]
        if self.endpoint.replicas > 1 and self.limits.backend == "memory" and rated:
            raise ValueError(
                f"doorman: tenants {', '.join(rated)} have rpm or tpm limits, which "
                f"{self.endpoint.replicas} replicas each counting in memory would enforce "
                "once per replica; set doorman.limits.backend = 'redis' to share them"
            )
        return self
