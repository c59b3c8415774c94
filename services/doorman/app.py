"""Builds the Doorman from its section: upstream routes, policy stages, the ledger."""

from __future__ import annotations

import logging

import grpc
from prometheus_client import CollectorRegistry

from doorman.auth import Authenticator, Tenant
from doorman.breaker import CircuitBreaker
from doorman.cache import MemoryResults, RedisResults, ResultCache, ResultStore
from doorman.config import CacheConfig, DoormanConfig, RouteStep, TenantConfig
from doorman.core import Doorman, DoormanMetrics, Policy
from doorman.ledger_sink import LedgerSink
from doorman.limits import BucketStore, MemoryBuckets, RedisBuckets, TenantLimiter, TierQueue
from doorman.routing import TIERS, Manifest, RetryPolicy, Route, Router, RoutingTable
from doorman.safety import SafetyFilter
from doorman.sanitize import PresidioDetector, Sanitiser
from doorman.servicer import DoormanServicer
from slm.discovery import Connector
from slm.runtime import Runtime
from slm.v1 import doorman_pb2, doorman_pb2_grpc, inference_pb2_grpc, ledger_pb2_grpc

log = logging.getLogger(__name__)


class DoormanApp:
    service_names: tuple[str, ...] = (
        doorman_pb2.DESCRIPTOR.services_by_name["DoormanService"].full_name,
    )

    def __init__(
        self, config: DoormanConfig, connector: Connector, registry: CollectorRegistry
    ) -> None:
        self.config = config
        # Channels connect lazily, so the Doorman starts even while its upstreams are still loading.
        self._connector = connector
        self._breakers: dict[str, CircuitBreaker] = {}
        ledger = LedgerSink(
            ledger_pb2_grpc.LedgerServiceStub(connector.channel(config.ledger)),
            config.ledger_mode,
            config.ledger_spool,
            registry,
        )
        self._ledger = ledger
        metrics = DoormanMetrics(registry)
        routing = config.routing
        table = RoutingTable(
            default=[self._route(RouteStep(tier="local", upstream=config.inference_local))],
            routes={r.model: [self._route(step) for step in r.chain] for r in routing.routes},
            manifests={
                m.alias: Manifest(m.alias, m.router_model, dict(m.intents), m.fallback)
                for m in routing.manifests
            },
        )
        router = Router(
            RetryPolicy(
                attempts=routing.retry_attempts,
                initial_backoff_s=routing.retry_initial_backoff_s,
                max_backoff_s=routing.retry_max_backoff_s,
                first_token_timeout_s=routing.first_token_timeout_s,
            ),
            on_upstream_error=lambda tier, code: metrics.upstream_errors.labels(tier, code).inc(),
            demand=metrics.tier_demand.labels,
        )
        self._buckets: BucketStore | None = None
        self.doorman = Doorman(
            table, router, ledger, metrics, config.default_timeout_s, self._policy(table)
        )

    def _route(self, step: RouteStep) -> Route:
        if step.upstream not in self._breakers:
            routing = self.config.routing
            self._breakers[step.upstream] = CircuitBreaker(
                routing.breaker_failures, routing.breaker_reset_s
            )
        sanitize = step.sanitize
        if sanitize is None:
            sanitize = step.tier in self.config.privacy.sanitize_tiers
        return Route(
            tier=TIERS[step.tier],
            address=step.upstream,
            # A model only some replicas hold goes to those.
            stub=inference_pb2_grpc.InferenceServiceStub(
                self._connector.model_channel(step.upstream)
            ),
            breaker=self._breakers[step.upstream],
            # Tier C only ever sees sanitised text, whatever a route says.
            sanitize=sanitize or step.tier == "external",
            model=step.model,
            cold_start_wait_s=step.cold_start_wait_s,
        )

    def _policy(self, table: RoutingTable) -> Policy:
        config = self.config
        authenticator = Authenticator(
            ((digest, _tenant(t)) for t in config.tenants for digest in t.key_hashes),
            pepper=config.key_pepper,
            required=config.auth_enabled,
        )
        self._authenticator = authenticator
        if not authenticator.required:
            log.warning(
                "authentication is off: every caller is tenant 'anonymous'; allowed only because "
                "the Doorman listens on loopback (%s)",
                config.endpoint.host,
            )
        limiter = None
        if any(_tenant(t).limited for t in config.tenants):
            self._buckets = (
                RedisBuckets(config.limits.redis_url)
                if config.limits.backend == "redis"
                else MemoryBuckets()
            )
            limiter = TenantLimiter(self._buckets)
        routes = [route for model in {"", *table.aliases} for route in table.chain(model)]
        sanitiser = None
        if any(route.sanitize for route in routes):
            privacy = config.privacy
            sanitiser = Sanitiser(
                PresidioDetector(
                    privacy.entities,
                    privacy.custom_patterns,
                    privacy.deny_terms,
                    privacy.min_score,
                )
            )
        safety = config.safety
        self._cache = _result_cache(config.cache)
        return Policy(
            authenticator=authenticator,
            limiter=limiter,
            tier_queues={
                TIERS[q.tier]: TierQueue(q.tier, q.max_concurrent, q.max_queue)
                for q in config.limits.tier_queues
            },
            sanitiser=sanitiser,
            safety=(
                SafetyFilter(
                    safety.input_deny,
                    safety.output_deny,
                    redact=safety.output_action == "redact",
                    window=safety.output_window_chars,
                )
                if safety.input_deny or safety.output_deny
                else None
            ),
            cache=self._cache,
        )

    def add_to_server(self, server: grpc.aio.Server) -> None:
        doorman_pb2_grpc.add_DoormanServiceServicer_to_server(
            DoormanServicer(self.doorman, self._authenticator), server
        )

    async def start(self) -> None:
        await self._ledger.start()

    async def stop(self) -> None:
        await self.doorman.drain()
        if self._buckets is not None:
            await self._buckets.close()
        if self._cache is not None:
            await self._cache.close()


def _result_cache(config: CacheConfig) -> ResultCache | None:
    if not config.enabled:
        return None
    store: ResultStore = (
        RedisResults(config.redis_url, config.ttl_s)
        if config.backend == "redis"
        else MemoryResults(config.ttl_s, config.max_entries, config.max_bytes)
    )
    return ResultCache(store, config.max_entry_bytes)


def _tenant(config: TenantConfig) -> Tenant:
    return Tenant(
        name=config.name,
        allowed_models=frozenset(config.allowed_models),
        rpm=config.rpm,
        tpm=config.tpm,
        max_concurrent=config.max_concurrent,
        priority=config.priority,
    )


def build_app(config: DoormanConfig, runtime: Runtime) -> DoormanApp:
    return DoormanApp(config, runtime.connector, runtime.registry)
