"""The Doorman's core: admits, sanitises, routes, rehydrates, filters and records every generation.

It passes the upstream's protobuf messages through rather than converting each token chunk:
the Doorman sits on the hot path of every token. With no policy configured (no tenants, no
sanitising tier, no safety patterns) the per-token loop does nothing but forward.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Coroutine,
    Iterator,
    Mapping,
    Sequence,
)
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from doorman.auth import Authenticator, Principal, Tenant
from doorman.cache import ResultCache, cache_key, cacheable, deterministic
from doorman.ledger_sink import LedgerSink
from doorman.limits import TenantLimiter, TierQueue
from doorman.outbound import Outbound
from doorman.routing import (
    Attempts,
    IntentClassifier,
    Manifest,
    Metadata,
    Opened,
    Route,
    Router,
    RoutingTable,
)
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
        self.cache_hits = Counter(
            "slm_doorman_cache_hits",
            "Requests answered from the result cache, by model.",
            ["model"],
            registry=registry,
        )
        self.cache_misses = Counter(
            "slm_doorman_cache_misses",
            "Cacheable requests the result cache had no answer for, by model.",
            ["model"],
            registry=registry,
        )
        self.cache_errors = Counter(
            "slm_doorman_cache_errors",
            "Result cache reads and writes that failed (the request went upstream), by operation.",
            ["operation"],
            registry=registry,
        )
        self.queue_depth = Gauge(
            "slm_doorman_queue_depth",
            "Requests waiting in a tier's queue.",
            ["tier"],
            registry=registry,
        )
        # What an autoscaler of a tier's pool reads (the chart's KEDA ScaledObjects): it is
        # above zero while a request waits for a pool scaled to zero.
        self.tier_demand = Gauge(
            "slm_doorman_tier_demand",
            "Generations waiting for or streaming from a tier, by the model it serves them.",
            ["tier", "model"],
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
    # Who the transport already authenticated from it (the servicer does, before it reads the
    # request); None: the core authenticates.
    principal: Principal | None = None
    # Neither answer from the result cache nor keep the answer in it (Cache-Control: no-cache).
    cache_bypass: bool = False


@dataclass(frozen=True)
class Policy:
    """The optional stages of a request; the defaults add no work at all."""

    authenticator: Authenticator = field(default_factory=lambda: Authenticator((), required=False))
    limiter: TenantLimiter | None = None
    tier_queues: Mapping[types_pb2.Tier.ValueType, TierQueue] = field(default_factory=dict)
    sanitiser: Sanitiser | None = None
    safety: SafetyFilter | None = None
    cache: ResultCache | None = None


@dataclass(frozen=True)
class _Caching:
    """A cacheable request's keys: of its plain form, and of its sanitised form where a route
    that may serve it sanitises; each None where no such route serves it."""

    plain: str | None
    sanitised: str | None


@dataclass
class _Outcome:
    """What one request did, filled in as it goes: metrics, a log line and a ledger entry."""

    principal: Principal
    model: str
    started: float
    route: Route | None = None
    code: grpc.StatusCode = grpc.StatusCode.OK
    ttft: float | None = None
    end: types_pb2.StreamEnd | None = None
    hops: list[types_pb2.RouteHop] = field(default_factory=list)
    attempts: Attempts = field(default_factory=Attempts)
    masked: dict[str, int] = field(default_factory=dict)
    # Names of the tools the model called, one per call; never their arguments.
    tool_calls: list[str] = field(default_factory=list)
    # True once the request's ledger record was handed to the ledger sink.
    recorded: bool = False
    # Set for a cacheable request; a complete answer from upstream is kept under its key.
    caching: _Caching | None = None
    cache_hit: bool = False


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


class _Replay:
    """A cached answer, read like an upstream's stream."""

    def __init__(self, events: list[inference_pb2.GenerateResponse], sanitised: bool) -> None:
        self._events = iter(events)
        # The answer is in placeholder form: rehydrate it with this request's own mapping.
        self.sanitised = sanitised
        self.first = next(self._events)
        self.call = self

    async def read(self) -> Any:
        """The next event, or grpc.aio.EOF after the end, as an upstream call's read()."""
        return next(self._events, grpc.aio.EOF)

    def cancel(self) -> bool:
        return True


@dataclass(frozen=True)
class _Job:
    """A generation on its way upstream: the client's request, its sanitised copy, its deadline."""

    request: inference_pb2.GenerateRequest
    sanitised: _Sanitised
    deadline: float
    metadata: Metadata


def _metadata(call: CallInfo) -> Metadata:
    return (("x-request-id", call.request_id),)


def _status_of(error: BaseException) -> grpc.StatusCode:
    """The status a request ended with, as the client sees it."""
    if isinstance(error, SlmError):
        return error.code
    if isinstance(error, asyncio.CancelledError | GeneratorExit):
        return grpc.StatusCode.CANCELLED
    return grpc.StatusCode.INTERNAL


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
        principal = self._principal(call)

        async def build(route: Route) -> inference_pb2.ListModelsRequest:
            return inference_pb2.ListModelsRequest()

        response: inference_pb2.ListModelsResponse = await self._router.unary(
            self._table.chain(""),
            "ListModels",
            build,
            deadline=time.monotonic() + 10,
            metadata=_metadata(call),
            attempts=Attempts(),
        )
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
        self._authenticate(call, model)
        masked: list[str] = []

        async def build(route: Route) -> inference_pb2.EmbedRequest:
            if route.sanitize and not masked:
                masked.extend(self._mask_all(inputs))
            texts = masked if route.sanitize else inputs
            return inference_pb2.EmbedRequest(model=route.model_for(model), inputs=texts)

        response: inference_pb2.EmbedResponse = await self._router.unary(
            self._table.chain(model),
            "Embed",
            build,
            deadline=self._deadline(call),
            metadata=_metadata(call),
            attempts=Attempts(),
        )
        return response

    async def count_tokens(self, request: inference_pb2.CountTokensRequest, call: CallInfo) -> int:
        """Prompt tokens of the request as the first upstream of its chain that answers sees it.

        The count is of the sanitised text where the route sanitises, since that is what the
        upstream would be sent. A manifest alias counts on its fallback model: which specialist
        serves depends on a generation the count must not run.
        """
        self._authenticate(call, request.model)
        manifest = self._table.manifest(request.model)
        model = manifest.fallback if manifest is not None else request.model
        # Sanitised as a generation would be, and only if a route asks for it.
        as_generation = inference_pb2.GenerateRequest(model=request.model, tools=request.tools)
        if request.HasField("chat"):
            as_generation.chat.CopyFrom(request.chat)
        else:
            as_generation.prompt = request.prompt
        sanitised = _Sanitised(self._policy.sanitiser, as_generation)

        async def build(route: Route) -> inference_pb2.CountTokensRequest:
            routed = inference_pb2.CountTokensRequest()
            routed.CopyFrom(request)
            routed.model = route.model_for(model)
            if route.sanitize:
                masked = (await sanitised.get())[0]
                routed.tools.CopyFrom(masked.tools)
                if masked.HasField("chat"):
                    routed.chat.CopyFrom(masked.chat)
                else:
                    routed.prompt = masked.prompt
            return routed

        response: inference_pb2.CountTokensResponse = await self._router.unary(
            self._table.chain(model),
            "CountTokens",
            build,
            deadline=self._deadline(call),
            metadata=_metadata(call),
            attempts=Attempts(),
        )
        return response.prompt_tokens

    async def generate(
        self, request: inference_pb2.GenerateRequest, call: CallInfo
    ) -> AsyncIterator[inference_pb2.GenerateResponse]:
        """Stream the upstream's events; the final `end` carries tier, upstream, hops, entities.

        Slots and permits live on one exit stack; as it unwinds, whatever ended the request,
        they are given back and the request is accounted for (metrics, ledger, token charge).
        The final event leaves only once the request's ledger record is durable; an error
        status, only once the record of the failed request is.
        """
        principal = self._authenticate(call, request.model)
        self._ledger.admit()
        outcome = _Outcome(principal, request.model, started=time.perf_counter())

        async def record() -> None:
            await self._commit_record(request, call, outcome)

        async with contextlib.AsyncExitStack() as stack:
            stack.push_async_callback(self._account, request, call, outcome)
            stack.enter_context(self._metrics.in_flight.track_inprogress())
            try:
                await self._admit(stack, principal.tenant)
                self._check_input(request)
                job = _Job(
                    request,
                    _Sanitised(self._policy.sanitiser, request),
                    self._deadline(call),
                    _metadata(call),
                )
                replay = await self._cached(job, call, outcome)
                if replay is not None:
                    stream = await stack.enter_async_context(
                        contextlib.aclosing(self._stream(replay, job.sanitised, outcome, record))
                    )
                    async for response in stream:
                        yield response
                    return
                model = await self._choose_model(job, outcome)
                chain = self._table.chain(model)
                await self._wait_for_tier(stack, chain, principal.tenant)
                opened = await self._open(job, model, chain, outcome)
                stack.callback(opened.release)
                stream = await stack.enter_async_context(
                    contextlib.aclosing(self._stream(opened, job.sanitised, outcome, record))
                )
                async for response in stream:
                    yield response
            except grpc.aio.AioRpcError as error:
                # Only a stream that broke after its first event: routing converts the rest.
                raise self._broken_stream(error, outcome) from None
            except BaseException as error:
                outcome.code = _status_of(error)
                raise

    def _principal(self, call: CallInfo) -> Principal:
        if call.principal is not None:
            return call.principal
        return self._policy.authenticator.authenticate(call.authorization)

    def _authenticate(self, call: CallInfo, model: str) -> Principal:
        principal = self._principal(call)
        self._policy.authenticator.check_model(principal, model)
        return principal

    async def _admit(self, stack: contextlib.AsyncExitStack, tenant: Tenant) -> None:
        """A request slot within the tenant's concurrency and rate limits, held on `stack`."""
        limiter = self._policy.limiter
        if limiter is not None and tenant.limited:
            await stack.enter_async_context(limiter.admitted(tenant))

    def _check_input(self, request: inference_pb2.GenerateRequest) -> None:
        if self._policy.safety is not None:
            self._policy.safety.check_fields(input_fields(request))

    def _deadline(self, call: CallInfo) -> float:
        timeout = min(call.timeout_s or self._default_timeout_s, self._default_timeout_s)
        return time.monotonic() + timeout

    async def _cached(self, job: _Job, call: CallInfo, outcome: _Outcome) -> _Replay | None:
        """The request's answer from the result cache, if it is cacheable and there.

        The key is of the request as an upstream that may serve it is sent: sanitised where that
        route sanitises (a cached answer then holds placeholders, rehydrated below with this
        request's own mapping), plain where it does not (the answer is then the upstream's own
        text, found only by a request with the very same personal data).
        """
        cache = self._policy.cache
        request = job.request
        if cache is None or call.cache_bypass or not deterministic(request.sampling):
            return None
        tenant = outcome.principal.tenant.name
        forms = {route.sanitize for route in self._answer_routes(request.model)}
        plain = cache_key(tenant, request) if False in forms else None
        sanitised = None
        masking = None
        if True in forms and self._policy.sanitiser is not None:
            try:
                masked_request, masking = await job.sanitised.get()
                sanitised = cache_key(tenant, masked_request)
            except SlmError:
                # Only the cache's lookup failed here: a route that needs the sanitised
                # request fails it as it would have, one that does not is still tried.
                pass
        outcome.caching = _Caching(plain, sanitised)
        keys = [key for key in (plain, sanitised) if key is not None]
        try:
            found = await cache.get(keys)
        except SlmError as error:
            self._metrics.cache_errors.labels("get").inc()
            log.warning("result cache read failed", extra={"error": error.message})
            found = None
        if found is None:
            self._metrics.cache_misses.labels(request.model).inc()
            return None
        key, events = found
        self._metrics.cache_hits.labels(request.model).inc()
        outcome.cache_hit = True
        # Nothing is kept again from a replay.
        outcome.caching = None
        outcome.ttft = time.perf_counter() - outcome.started
        # Where plain and sanitised text are the same, no placeholder was made to restore.
        in_placeholders = key == sanitised and key != plain
        if in_placeholders and masking is not None:
            outcome.masked = dict(masking.counts)
        return _Replay(events, sanitised=in_placeholders)

    def _answer_routes(self, model: str) -> list[Route]:
        """Every route that may produce the answer to `model`: a manifest's specialists'."""
        manifest = self._table.manifest(model)
        if manifest is None:
            return list(self._table.chain(model))
        models = {*manifest.intents.values(), manifest.fallback}
        return [route for name in sorted(models) for route in self._table.chain(name)]

    async def _keep(self, key: str, events: list[bytes]) -> None:
        cache = self._policy.cache
        assert cache is not None
        try:
            await cache.put(key, events)
        except SlmError as error:
            self._metrics.cache_errors.labels("put").inc()
            log.warning("result cache write failed", extra={"error": error.message})

    async def _choose_model(self, job: _Job, outcome: _Outcome) -> str:
        """The model to serve: the request's, or the specialist its manifest's router picks."""
        manifest = self._table.manifest(job.request.model)
        if manifest is None:
            return job.request.model
        return await self._route_by_intent(manifest, job, outcome)

    async def _wait_for_tier(
        self, stack: contextlib.AsyncExitStack, chain: Sequence[Route], tenant: Tenant
    ) -> None:
        """A slot at the first tier of the chain, where that tier has a queue, held on `stack`."""
        queue = self._policy.tier_queues.get(chain[0].tier) if chain else None
        if queue is None:
            return
        depth = self._metrics.queue_depth.labels(chain[0].tier_name)
        depth.inc()
        try:
            await stack.enter_async_context(queue.slot(tenant.priority))
        finally:
            depth.dec()

    async def _open(
        self, job: _Job, model: str, chain: Sequence[Route], outcome: _Outcome
    ) -> Opened:
        """The generation, opened on the first route of the chain that answers."""

        async def build(route: Route) -> inference_pb2.GenerateRequest:
            source = (await job.sanitised.get())[0] if route.sanitize else job.request
            target = route.model_for(model)
            if target == source.model:
                return source
            routed = inference_pb2.GenerateRequest()
            routed.CopyFrom(source)
            routed.model = target
            return routed

        opened = await self._router.open(
            chain,
            build,
            deadline=job.deadline,
            metadata=job.metadata,
            attempts=outcome.attempts,
            model=model,
        )
        outcome.ttft = time.perf_counter() - outcome.started
        route = outcome.route = opened.route
        if route.sanitize and job.sanitised.masking is not None:
            outcome.masked = dict(job.sanitised.masking.counts)
        if outcome.hops:
            # The router model's hop is there: name the specialist's after it.
            outcome.hops.append(
                types_pb2.RouteHop(
                    model=route.model_for(model), tier=route.tier, upstream=route.address
                )
            )
        return opened

    def _broken_stream(self, error: grpc.aio.AioRpcError, outcome: _Outcome) -> SlmError:
        outcome.code = error.code()
        tier = outcome.route.tier_name if outcome.route else "TIER_UNSPECIFIED"
        self._metrics.upstream_errors.labels(tier, outcome.code.name).inc()
        if outcome.code == grpc.StatusCode.CANCELLED:
            return Unavailable("the upstream cancelled the generation", retry_after_s=1)
        return from_rpc_error(error)

    async def _account(
        self, request: inference_pb2.GenerateRequest, call: CallInfo, outcome: _Outcome
    ) -> None:
        """The request has ended, however: charge its tokens, observe it, and record it
        unless its record went before its final event."""
        limiter = self._policy.limiter
        tenant = outcome.principal.tenant
        if limiter is not None and tenant.limited and outcome.end is not None:
            self._spawn(self._charge(limiter, tenant, outcome.end.usage.total_tokens))
        latency = time.perf_counter() - outcome.started
        self._observe(outcome, latency)
        if outcome.recorded:
            return
        outcome.recorded = True
        entry = self._entry(request, call, outcome, latency)
        if outcome.code == grpc.StatusCode.CANCELLED:
            # The client is gone and is told nothing: nothing to hold back for the record.
            self._ledger.submit(entry)
            return
        try:
            # The error status leaves as this returns: the record is durable before it.
            await self._ledger.commit(entry)
        except SlmError as error:
            # The client learns the request failed either way; the error it gets stays its own.
            log.error(
                "the record of a failed request was not kept",
                extra={"ledger_request_id": call.request_id, "error": error.message},
            )

    async def _commit_record(
        self, request: inference_pb2.GenerateRequest, call: CallInfo, outcome: _Outcome
    ) -> None:
        """Make the request's record durable; called just before its final event is sent."""
        latency = time.perf_counter() - outcome.started
        outcome.recorded = True
        try:
            await self._ledger.commit(self._entry(request, call, outcome, latency))
        except SlmError:
            # Dropped by the sink: the request ends with this error and is recorded as such.
            outcome.recorded = False
            raise

    def _mask_all(self, texts: list[str]) -> list[str]:
        sanitiser = self._policy.sanitiser
        if sanitiser is None:
            raise Unavailable("a route needs sanitising but no sanitiser is configured")
        # One masking for all texts: the same value gets the same placeholder in each.
        masking = Masking("".join(texts))
        return [sanitiser.mask(masking, text) for text in texts]

    async def _stream(
        self,
        opened: Opened | _Replay,
        sanitised: _Sanitised,
        outcome: _Outcome,
        record: Callable[[], Awaitable[None]],
    ) -> AsyncGenerator[inference_pb2.GenerateResponse, None]:
        """The upstream's events, through the output policy where there is one; the hot path.

        `record` makes the request's ledger record durable; the final event waits for it.
        """
        rpc = opened.call
        in_placeholders = opened.sanitised if isinstance(opened, _Replay) else opened.route.sanitize
        masking = sanitised.masking if in_placeholders else None
        placeholders = masking.placeholders if masking is not None else {}
        safety = self._policy.safety
        outbound: Outbound | None = None
        if placeholders or (safety is not None and safety.filters_output):
            outbound = Outbound(
                placeholders, safety.output_filter if safety is not None else lambda: None
            )
        deltas = 0
        # The upstream's events as it sent them, before the output path rewrites them in place.
        kept: list[bytes] | None = [] if outcome.caching is not None else None
        # What may still be kept: an answer that outgrows the cache's entry limit stops being
        # copied at once, rather than held whole until its end only to be refused there.
        room = self._policy.cache.max_entry_bytes if self._policy.cache is not None else 0
        response = opened.first
        try:
            while response is not grpc.aio.EOF:
                if kept is not None:
                    event = response.SerializeToString()
                    room -= len(event)
                    kept.append(event)
                    if room < 0:
                        kept = None
                if response.HasField("end"):
                    if outbound is not None:
                        for tail in outbound.flush():
                            yield inference_pb2.GenerateResponse(delta=tail)
                    if kept is not None:
                        self._keep_answer(response.end, outcome, kept)
                    self._finish(response.end, outcome, outbound)
                    await record()
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
                        end = self._content_filtered(outcome, deltas)
                        await record()
                        yield end
                        return
                    if alive:
                        yield response
                response = await rpc.read()
        finally:
            rpc.cancel()

    def _keep_answer(self, end: types_pb2.StreamEnd, outcome: _Outcome, kept: list[bytes]) -> None:
        """Keep a complete answer under the key of the form its upstream was sent."""
        caching, route = outcome.caching, outcome.route
        if caching is None or route is None or not cacheable(end):
            return
        key = caching.sanitised if route.sanitize else caching.plain
        if key is not None:
            # Off the stream's path: the client's final event need not wait for the cache.
            self._spawn(self._keep(key, kept))

    def _finish(
        self, end: types_pb2.StreamEnd, outcome: _Outcome, outbound: Outbound | None
    ) -> None:
        route = outcome.route
        if route is not None:
            end.tier = route.tier
            end.upstream = route.address
        else:
            # A replay from the result cache: no upstream served this request.
            end.tier = types_pb2.TIER_UNSPECIFIED
            end.upstream = ""
        end.cache_hit = outcome.cache_hit
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

    async def _route_by_intent(self, manifest: Manifest, job: _Job, outcome: _Outcome) -> str:
        """Ask the manifest's router model for an intent; returns the specialist to serve."""
        plain = _last_user_text(job.request)
        masked_text = ""
        if any(route.sanitize for route in self._table.chain(manifest.router_model)):
            sanitised_request, _ = await job.sanitised.get()
            masked_text = _last_user_text(sanitised_request)

        def text_for(route: Route) -> str:
            return masked_text if route.sanitize else plain

        intent, route = await self._classifier.classify(
            manifest,
            self._table.chain(manifest.router_model),
            text_for,
            deadline=job.deadline,
            metadata=job.metadata,
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
        tier = (
            outcome.route.tier_name
            if outcome.route
            else "cache"
            if outcome.cache_hit
            else "TIER_UNSPECIFIED"
        )
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

    def _entry(
        self,
        request: inference_pb2.GenerateRequest,
        call: CallInfo,
        outcome: _Outcome,
        latency: float,
    ) -> ledger_pb2.LedgerEntry:
        """The request's ledger record as it stands; never prompt or completion text."""
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
            cache_hit=outcome.cache_hit,
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
        return entry

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
