"""The Doorman's core: admits, sanitises, routes, rehydrates, filters and records every generation.

It passes the upstream's protobuf messages through rather than converting each token chunk:
the Doorman sits on the hot path of every token. With no policy configured (no tenants, no
sanitising tier, no safety patterns) the per-token loop does nothing but forward.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Coroutine, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from doorman.auth import Authenticator, Principal, Tenant
from doorman.ledger_sink import LedgerSink
from doorman.limits import TenantLimiter, TierQueue
from doorman.outbound import Outbound
from doorman.routing import Attempts, IntentClassifier, Manifest, Route, Router, RoutingTable
from doorman.safety import SafetyFilter
from doorman.sanitize import Masking, Sanitiser
from slm.errors import SlmError, Unavailable, from_rpc_error
from slm.v1 import inference_pb2, ledger_pb2, types_pb2

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

# Texts longer than this are masked on a worker thread so the event loop keeps streaming others.
_MASK_INLINE_CHARS = 4096


class DoormanMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "slm_doorman_requests",
            "Requests finished, by model, tier and status code.",
            ["model", "tier", "code"],
            registry=registry,
        )
        self.ttft = Histogram(
            "slm_doorman_ttft_seconds",
            "Time to first token as the Doorman sees it.",
            ["model", "tier"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.latency = Histogram(
            "slm_doorman_request_seconds",
            "End-to-end time of a request in the Doorman.",
            ["model", "tier"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.tokens_in = Counter(
            "slm_doorman_prompt_tokens", "Prompt tokens.", ["model", "tier"], registry=registry
        )
        self.tokens_out = Counter(
            "slm_doorman_completion_tokens",
            "Completion tokens.",
            ["model", "tier"],
            registry=registry,
        )
        self.in_flight = Gauge(
            "slm_doorman_in_flight_requests", "Requests being served.", registry=registry
        )
        self.upstream_errors = Counter(
            "slm_doorman_upstream_errors",
            "Failed upstream calls, by tier and code.",
            ["tier", "code"],
            registry=registry,
        )
        self.ledger_errors = Counter(
            "slm_doorman_ledger_errors", "Ledger appends that failed.", registry=registry
        )
        self.masked_entities = Counter(
            "slm_doorman_masked_entities",
            "Personal-data values replaced by placeholders, by entity type.",
            ["entity"],
            registry=registry,
        )
        self.policy_decisions = Counter(
            "slm_doorman_policy_decisions",
            "Routing and policy decisions (fallback, breaker_open, safety, router), by kind.",
            ["kind"],
            registry=registry,
        )
        self.queue_depth = Gauge(
            "slm_doorman_queue_depth",
            "Requests waiting in a tier's queue.",
            ["tier"],
            registry=registry,
        )


@dataclass
class CallInfo:
    """What the caller told us about the call: who, which request, how long it may take."""

    request_id: str
    operation: str
    timeout_s: float | None = None
    # The "authorization" metadata, e.g. "Bearer KEY".
    authorization: str | None = None


@dataclass(frozen=True)
class Policy:
    """The optional stages of a request; the defaults add no work at all."""

    authenticator: Authenticator = field(default_factory=lambda: Authenticator((), required=False))
    limiter: TenantLimiter | None = None
    tier_queues: Mapping[types_pb2.Tier.ValueType, TierQueue] = field(default_factory=dict)
    sanitiser: Sanitiser | None = None
    safety: SafetyFilter | None = None


@dataclass
class _Outcome:
    """What one request did, filled in as it goes: metrics, a log line and a ledger entry."""

    principal: Principal
    model: str
    route: Route | None = None
    code: grpc.StatusCode = grpc.StatusCode.OK
    ttft: float | None = None
    end: types_pb2.StreamEnd | None = None
    hops: list[types_pb2.RouteHop] = field(default_factory=list)
    attempts: Attempts = field(default_factory=Attempts)
    masked: dict[str, int] = field(default_factory=dict)
    # Names of the tools the model called, one per call; never their arguments.
    tool_calls: list[str] = field(default_factory=list)


class _Sanitised:
    """The request's sanitised copy, made once and only if a route asks for it."""

    def __init__(self, sanitiser: Sanitiser | None, request: inference_pb2.GenerateRequest) -> None:
        self._sanitiser = sanitiser
        self._request = request
        self.request: inference_pb2.GenerateRequest | None = None
        self.masking: Masking | None = None

    async def get(self) -> tuple[inference_pb2.GenerateRequest, Masking]:
        if self.request is not None and self.masking is not None:
            return self.request, self.masking
        if self._sanitiser is None:
            raise Unavailable("a route needs sanitising but no sanitiser is configured")
        size = self._request.ByteSize()
        if size > _MASK_INLINE_CHARS:
            request, masking = await asyncio.to_thread(self._sanitiser.sanitize, self._request)
        else:
            request, masking = self._sanitiser.sanitize(self._request)
        self.request, self.masking = request, masking
        return request, masking


def input_fields(request: inference_pb2.GenerateRequest) -> Iterator[tuple[str, str]]:
    """Every text of a request that reaches the model, named as the field it came from."""
    if not request.HasField("chat"):
        yield "prompt", request.prompt
        return
    for i, message in enumerate(request.chat.messages):
        yield f"messages[{i}].content", message.content
        for j, call in enumerate(message.tool_calls):
            yield f"messages[{i}].tool_calls[{j}].arguments", call.arguments
    for k, tool in enumerate(request.tools.tools):
        yield f"tools[{k}].description", tool.description


def _last_user_text(request: inference_pb2.GenerateRequest) -> str:
    if not request.HasField("chat"):
        return request.prompt
    for message in reversed(request.chat.messages):
        if message.role == types_pb2.ROLE_USER:
            return message.content
    return request.chat.messages[-1].content if request.chat.messages else ""


def _constraint_kind(request: inference_pb2.GenerateRequest) -> str:
    """The ledger's name for what constrained the output.

    The OutputConstraint's kind ("json_schema", "regex", ...) when one was asked for; else
    "tools" when tools were offered with a choice other than none (a call, once started, is
    constrained to its schema); else "".
    """
    kind = request.sampling.constraint.WhichOneof("kind")
    if kind is not None:
        return kind
    tools = request.tools
    if tools.tools and tools.choice.mode != types_pb2.TOOL_CHOICE_MODE_NONE:
        return "tools"
    return ""


class Doorman:
    def __init__(
        self,
        table: RoutingTable,
        router: Router,
        ledger: LedgerSink,
        metrics: DoormanMetrics,
        default_timeout_s: float,
        policy: Policy | None = None,
    ) -> None:
        self._table = table
        self._router = router
        self._classifier = IntentClassifier(router)
        self._ledger = ledger
        self._metrics = metrics
        self._default_timeout_s = default_timeout_s
        self._policy = policy or Policy()
        self._pending: set[asyncio.Task[None]] = set()

    async def list_models(self, call: CallInfo) -> list[types_pb2.ModelInfo]:
        principal = self._policy.authenticator.authenticate(call.authorization)
        upstream = self._table.chain("")[0]
        try:
            response = await upstream.stub.ListModels(inference_pb2.ListModelsRequest(), timeout=10)
        except grpc.aio.AioRpcError as error:
            raise from_rpc_error(error) from None
        models = list(response.models)
        known = {m.name for m in models}
        models += [
            types_pb2.ModelInfo(name=alias, owned_by="doorman")
            for alias in self._table.aliases
            if alias not in known
        ]
        return [m for m in models if principal.tenant.allows(m.name)]

    async def embed(
        self, model: str, inputs: list[str], call: CallInfo
    ) -> inference_pb2.EmbedResponse:
        """Embeddings from the first upstream of the model's chain that answers."""
        principal = self._policy.authenticator.authenticate(call.authorization)
        self._policy.authenticator.check_model(principal, model)
        last: SlmError = Unavailable("no upstream could serve the request", retry_after_s=1)
        for route in self._table.chain(model):
            texts = inputs
            if route.sanitize:
                if self._policy.sanitiser is None:
                    raise Unavailable("a route needs sanitising but no sanitiser is configured")
                masking = Masking("".join(inputs))
                texts = [self._policy.sanitiser.mask(masking, text) for text in inputs]
            try:
                response: inference_pb2.EmbedResponse = await route.stub.Embed(
                    inference_pb2.EmbedRequest(model=route.model_for(model), inputs=texts),
                    timeout=min(call.timeout_s or self._default_timeout_s, self._default_timeout_s),
                    metadata=(("x-request-id", call.request_id),),
                )
                return response
            except grpc.aio.AioRpcError as error:
                last = from_rpc_error(error)
                if error.code() != grpc.StatusCode.UNAVAILABLE:
                    raise last from None
        raise last

    async def count_tokens(self, request: inference_pb2.CountTokensRequest, call: CallInfo) -> int:
        """Prompt tokens of the request as the first upstream of its chain that answers sees it.

        The count is of the sanitised text where the route sanitises, since that is what the
        upstream would be sent. A manifest alias counts on its fallback model: which specialist
        serves depends on a generation the count must not run.
        """
        principal = self._policy.authenticator.authenticate(call.authorization)
        self._policy.authenticator.check_model(principal, request.model)
        manifest = self._table.manifest(request.model)
        model = manifest.fallback if manifest is not None else request.model
        timeout = min(call.timeout_s or self._default_timeout_s, self._default_timeout_s)
        last: SlmError = Unavailable("no upstream could count the tokens", retry_after_s=1)
        for route in self._table.chain(model):
            source = request
            if route.sanitize:
                if self._policy.sanitiser is None:
                    raise Unavailable("a route needs sanitising but no sanitiser is configured")
                generate = inference_pb2.GenerateRequest(model=request.model, tools=request.tools)
                if request.HasField("chat"):
                    generate.chat.CopyFrom(request.chat)
                else:
                    generate.prompt = request.prompt
                masked, _ = self._policy.sanitiser.sanitize(generate)
                source = inference_pb2.CountTokensRequest(tools=masked.tools)
                if masked.HasField("chat"):
                    source.chat.CopyFrom(masked.chat)
                else:
                    source.prompt = masked.prompt
            routed = inference_pb2.CountTokensRequest()
            routed.CopyFrom(source)
            routed.model = route.model_for(model)
            try:
                response: inference_pb2.CountTokensResponse = await route.stub.CountTokens(
                    routed,
                    timeout=timeout,
                    metadata=(("x-request-id", call.request_id),),
                )
                return response.prompt_tokens
            except grpc.aio.AioRpcError as error:
                last = from_rpc_error(error)
                if error.code() != grpc.StatusCode.UNAVAILABLE:
                    raise last from None
        raise last

    async def generate(
        self, request: inference_pb2.GenerateRequest, call: CallInfo
    ) -> AsyncIterator[inference_pb2.GenerateResponse]:
        """Stream the upstream's events; the final `end` carries tier, upstream, hops, entities."""
        policy = self._policy
        principal = policy.authenticator.authenticate(call.authorization)
        policy.authenticator.check_model(principal, request.model)
        self._ledger.admit()
        tenant = principal.tenant
        started = time.perf_counter()
        outcome = _Outcome(principal, request.model)
        limiter = policy.limiter if tenant.limited else None
        queue: TierQueue | None = None
        self._metrics.in_flight.inc()
        try:
            if limiter is not None:
                await limiter.admit(tenant)
            if policy.safety is not None:
                policy.safety.check_fields(input_fields(request))
            timeout = min(call.timeout_s or self._default_timeout_s, self._default_timeout_s)
            deadline = time.monotonic() + timeout
            metadata = (("x-request-id", call.request_id),)
            sanitised = _Sanitised(policy.sanitiser, request)
            model = request.model
            chain = self._table.chain(model)
            manifest = self._table.manifest(model)
            if manifest is not None:
                model = await self._route_by_intent(
                    manifest, request, sanitised, outcome, deadline, metadata
                )
                chain = self._table.chain(model)
            queue = policy.tier_queues.get(chain[0].tier) if chain else None
            if queue is not None:
                self._metrics.queue_depth.labels(chain[0].tier_name).inc()
                try:
                    await queue.acquire(tenant.priority)
                except BaseException:
                    queue = None
                    raise
                finally:
                    self._metrics.queue_depth.labels(chain[0].tier_name).dec()

            async def build(route: Route) -> inference_pb2.GenerateRequest:
                source = (await sanitised.get())[0] if route.sanitize else request
                target = route.model_for(model)
                if target == source.model:
                    return source
                routed = inference_pb2.GenerateRequest()
                routed.CopyFrom(source)
                routed.model = target
                return routed

            opened = await self._router.open(
                chain, build, deadline=deadline, metadata=metadata, attempts=outcome.attempts
            )
            outcome.ttft = time.perf_counter() - started
            route = outcome.route = opened.route
            if route.sanitize and sanitised.masking is not None:
                outcome.masked = dict(sanitised.masking.counts)
            if manifest is not None:
                outcome.hops.append(
                    types_pb2.RouteHop(
                        model=route.model_for(model), tier=route.tier, upstream=route.address
                    )
                )
            async for response in self._stream(opened.first, opened.call, sanitised, outcome):
                yield response
        except grpc.aio.AioRpcError as error:
            outcome.code = error.code()
            tier = outcome.route.tier_name if outcome.route else "TIER_UNSPECIFIED"
            self._metrics.upstream_errors.labels(tier, outcome.code.name).inc()
            failure = from_rpc_error(error)
            if outcome.code == grpc.StatusCode.CANCELLED:
                failure = Unavailable("the upstream cancelled the generation", retry_after_s=1)
            raise failure from None
        except SlmError as error:
            outcome.code = error.code
            raise
        except (asyncio.CancelledError, GeneratorExit):
            outcome.code = grpc.StatusCode.CANCELLED
            raise
        finally:
            if queue is not None:
                queue.release()
            self._metrics.in_flight.dec()
            if limiter is not None:
                limiter.release(tenant)
                if outcome.end is not None:
                    self._spawn(self._charge(limiter, tenant, outcome.end.usage.total_tokens))
            latency = time.perf_counter() - started
            self._observe(outcome, latency)
            self._record(request, call, outcome, latency)

    async def _stream(
        self,
        first: inference_pb2.GenerateResponse,
        rpc: grpc.aio.UnaryStreamCall,
        sanitised: _Sanitised,
        outcome: _Outcome,
    ) -> AsyncIterator[inference_pb2.GenerateResponse]:
        route = outcome.route
        assert route is not None
        masking = sanitised.masking if route.sanitize else None
        placeholders = masking.placeholders if masking is not None else {}
        safety = self._policy.safety
        outbound: Outbound | None = None
        if placeholders or (safety is not None and safety.filters_output):
            outbound = Outbound(
                placeholders, safety.output_filter if safety is not None else lambda: None
            )
        deltas = 0
        response = first
        try:
            while response is not grpc.aio.EOF:
                if response.HasField("end"):
                    if outbound is not None:
                        for tail in outbound.flush():
                            yield inference_pb2.GenerateResponse(delta=tail)
                    self._finish(response.end, outcome, outbound)
                    yield response
                    response = await rpc.read()
                    continue
                delta = response.delta
                if delta.tool_calls:
                    # Names only, for the ledger: a call's first piece carries its name.
                    outcome.tool_calls.extend(c.name for c in delta.tool_calls if c.name)
                if outbound is None:
                    yield response
                else:
                    deltas += 1
                    alive, stop = outbound.feed(delta)
                    if stop:
                        if alive:
                            yield response
                        yield self._content_filtered(outcome, deltas)
                        return
                    if alive:
                        yield response
                response = await rpc.read()
        finally:
            rpc.cancel()

    def _finish(
        self, end: types_pb2.StreamEnd, outcome: _Outcome, outbound: Outbound | None
    ) -> None:
        route = outcome.route
        assert route is not None
        end.tier = route.tier
        end.upstream = route.address
        if outcome.hops:
            end.hops.extend(outcome.hops)
        if outcome.masked:
            end.masked_entities.update(outcome.masked)
        if outbound is not None and outbound.triggered:
            outcome.attempts.decisions.append("safety:redacted")
        outcome.end = end

    def _content_filtered(self, outcome: _Outcome, deltas: int) -> inference_pb2.GenerateResponse:
        # The upstream is cancelled here, so its usage never arrives: count what was received.
        end = types_pb2.StreamEnd(
            finish_reason=types_pb2.FINISH_REASON_CONTENT_FILTER,
            usage=types_pb2.Usage(completion_tokens=deltas, total_tokens=deltas),
            model=outcome.model,
        )
        outcome.attempts.decisions.append("safety:content_filter")
        self._finish(end, outcome, None)
        return inference_pb2.GenerateResponse(end=end)

    async def _route_by_intent(
        self,
        manifest: Manifest,
        request: inference_pb2.GenerateRequest,
        sanitised: _Sanitised,
        outcome: _Outcome,
        deadline: float,
        metadata: tuple[tuple[str, str], ...],
    ) -> str:
        """Ask the manifest's router model for an intent; returns the specialist to serve."""
        plain = _last_user_text(request)
        masked_text = ""
        if any(route.sanitize for route in self._table.chain(manifest.router_model)):
            sanitised_request, _ = await sanitised.get()
            masked_text = _last_user_text(sanitised_request)

        def text_for(route: Route) -> str:
            return masked_text if route.sanitize else plain

        intent, route = await self._classifier.classify(
            manifest,
            self._table.chain(manifest.router_model),
            text_for,
            deadline=deadline,
            metadata=metadata,
            attempts=outcome.attempts,
        )
        if intent is None:
            outcome.attempts.decisions.append("router:fallback")
        outcome.hops.append(
            types_pb2.RouteHop(
                model=route.model_for(manifest.router_model),
                tier=route.tier,
                upstream=route.address,
                intent=intent or "",
            )
        )
        return manifest.intents[intent] if intent is not None else manifest.fallback

    def _observe(self, outcome: _Outcome, latency: float) -> None:
        model = outcome.model
        tier = outcome.route.tier_name if outcome.route else "TIER_UNSPECIFIED"
        self._metrics.requests.labels(model, tier, outcome.code.name).inc()
        self._metrics.latency.labels(model, tier).observe(latency)
        if outcome.ttft is not None:
            self._metrics.ttft.labels(model, tier).observe(outcome.ttft)
        end = outcome.end
        if end is not None:
            self._metrics.tokens_in.labels(model, tier).inc(end.usage.prompt_tokens)
            self._metrics.tokens_out.labels(model, tier).inc(end.usage.completion_tokens)
        for entity, count in outcome.masked.items():
            self._metrics.masked_entities.labels(entity).inc(count)
        for decision in outcome.attempts.decisions:
            self._metrics.policy_decisions.labels(decision.split(":", 1)[0]).inc()
        if outcome.masked or outcome.attempts.decisions:
            # Counts and decisions only: the values and the mapping never reach a log.
            log.info(
                "request policy",
                extra={
                    "tenant": outcome.principal.tenant.name,
                    "model": model,
                    "tier": tier,
                    "masked_entities": outcome.masked,
                    "decisions": outcome.attempts.decisions,
                },
            )

    def _record(
        self,
        request: inference_pb2.GenerateRequest,
        call: CallInfo,
        outcome: _Outcome,
        latency: float,
    ) -> None:
        now = Timestamp()
        now.GetCurrentTime()
        route = outcome.route
        end = outcome.end
        code = outcome.code
        entry = ledger_pb2.LedgerEntry(
            request_id=call.request_id,
            time=now,
            tenant=outcome.principal.tenant.name,
            key_id=outcome.principal.key_id,
            model=request.model,
            adapter=request.adapter,
            tier=route.tier if route else types_pb2.TIER_UNSPECIFIED,
            upstream=route.address if route else "",
            ttft_ms=(outcome.ttft or 0.0) * 1000,
            latency_ms=latency * 1000,
            status_code=code.value[0],
            operation=call.operation,
            hops=outcome.hops,
            entity_counts=outcome.masked,
            policy_decisions=outcome.attempts.decisions,
            tools_offered=[tool.name for tool in request.tools.tools],
            tool_calls=outcome.tool_calls,
            constraint=_constraint_kind(request),
            finish_reason=(
                end.finish_reason
                if end is not None
                else types_pb2.FINISH_REASON_CANCELLED
                if code == grpc.StatusCode.CANCELLED
                else types_pb2.FINISH_REASON_UNSPECIFIED
            ),
        )
        if end is not None:
            entry.prompt_tokens = end.usage.prompt_tokens
            entry.completion_tokens = end.usage.completion_tokens
        # Off the token path: the client has its answer before the ledger write finishes.
        self._ledger.submit(entry)

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _charge(self, limiter: TenantLimiter, tenant: Tenant, tokens: int) -> None:
        try:
            await limiter.charge(tenant, tokens)
        except SlmError as error:
            log.error(
                "token usage not charged", extra={"tenant": tenant.name, "error": error.message}
            )

    async def drain(self) -> None:
        """Wait for ledger writes still in flight; called on shutdown."""
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)
        await self._ledger.drain()
