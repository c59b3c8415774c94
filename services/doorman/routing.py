"""Tier routing: model -> chain of upstreams; retries and fallback before the first token."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import grpc
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    wait_exponential_jitter,
)

from doorman.breaker import CircuitBreaker
from slm.errors import DeadlineExceeded, NotFound, SlmError, Unavailable, from_rpc_error
from slm.v1 import inference_pb2, inference_pb2_grpc, types_pb2

TIERS: Mapping[str, types_pb2.Tier.ValueType] = {
    "local": types_pb2.TIER_LOCAL,
    "gpu": types_pb2.TIER_GPU,
    "external": types_pb2.TIER_EXTERNAL,
}

# Worth another attempt at the same upstream: it may be restarting or briefly overloaded.
_RETRY_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
# Worth the next tier, but not another attempt here: its queue is full.
_FALLBACK_CODES = _RETRY_CODES | {grpc.StatusCode.RESOURCE_EXHAUSTED}
# An upstream that is up but will not serve this model now (its manifest keeps the model on a
# remote tier, or it is switching manifests): the next tier at once, no retry there and no
# failure for its breaker.
_ELSEWHERE_REASONS = frozenset({"MODEL_REMOTE", "MANIFEST_SWITCHING"})

Metadata = tuple[tuple[str, str], ...]
UnaryRpc = Literal["Embed", "CountTokens", "Tokenize", "Detokenize", "ListModels"]
Rpc = Literal["Generate"] | UnaryRpc
RequestT = TypeVar("RequestT")
ResultT = TypeVar("ResultT")


@dataclass(frozen=True)
class Route:
    """One upstream of a chain, with the breaker shared by every route to that address."""

    tier: types_pb2.Tier.ValueType
    address: str
    stub: inference_pb2_grpc.InferenceServiceStub
    breaker: CircuitBreaker
    sanitize: bool = False
    # The model's name at this upstream; None keeps the client's.
    model: str | None = None
    # How long to keep trying an upstream that is not there (UNAVAILABLE) before the next
    # tier: a pool scaled to zero, starting while the request waits. 0: the usual retries.
    cold_start_wait_s: float = 0.0

    def model_for(self, requested: str) -> str:
        return self.model or requested

    def call(self, rpc: Rpc, request: Any, *, timeout: float, metadata: Metadata = ()) -> Any:
        """Calls `rpc` at this upstream: the one place a route's stub is called, so that a
        choice of replica by `request.model` has one home."""
        return getattr(self.stub, rpc)(request, timeout=timeout, metadata=metadata)

    @property
    def tier_name(self) -> str:
        return types_pb2.Tier.Name(self.tier)


@dataclass(frozen=True)
class Manifest:
    """A model alias: a router model picks an intent, the intent picks a specialist."""

    alias: str
    router_model: str
    intents: Mapping[str, str]
    fallback: str


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 2
    initial_backoff_s: float = 0.05
    max_backoff_s: float = 1.0
    first_token_timeout_s: float = 120.0


class RoutingTable:
    """Which chain serves a model; models without a route take the default chain."""

    def __init__(
        self,
        default: Sequence[Route],
        routes: Mapping[str, Sequence[Route]] | None = None,
        manifests: Mapping[str, Manifest] | None = None,
    ) -> None:
        self._default = tuple(default)
        self._routes = {model: tuple(chain) for model, chain in (routes or {}).items()}
        self._manifests = dict(manifests or {})

    def chain(self, model: str) -> tuple[Route, ...]:
        return self._routes.get(model, self._default)

    def manifest(self, model: str) -> Manifest | None:
        return self._manifests.get(model)

    @property
    def aliases(self) -> list[str]:
        return sorted({*self._routes, *self._manifests})


def _nothing() -> None:
    pass


@dataclass
class Opened:
    """A generation that has produced its first event on `route`; the rest is read from `call`.

    `release` ends the request's count in the route's demand; the caller calls it once the
    request is over."""

    route: Route
    call: Any  # grpc.aio.UnaryStreamCall; grpc ships no types
    first: inference_pb2.GenerateResponse
    release: Callable[[], None] = _nothing


class UpstreamFailure(Exception):
    """An attempt at one upstream failed in a way routing handles: retried there, or the next tier.

    `retry` says whether another attempt at the same upstream is worth it (it may be restarting)
    or only the next tier is (its queue is full).
    """

    def __init__(self, code: grpc.StatusCode, error: SlmError, *, retry: bool) -> None:
        super().__init__(error.message)
        self.code = code
        self.error = error
        self.retry = retry


def classify(error: grpc.aio.AioRpcError) -> UpstreamFailure | SlmError:
    """What an upstream's error means for routing: retry, fall back, or the caller's own answer."""
    code = error.code()
    failure = from_rpc_error(error)
    if code in _FALLBACK_CODES:
        retry = code in _RETRY_CODES and failure.reason not in _ELSEWHERE_REASONS
        return UpstreamFailure(code, failure, retry=retry)
    return failure


@dataclass
class Attempts:
    """What routing decided for one request, for the ledger and the client's StreamEnd."""

    decisions: list[str] = field(default_factory=list)


UpstreamErrorHook = Callable[[str, str], None]
# (tier name, model at the upstream) -> the gauge of generations waiting for or streaming from
# that tier for that model: what an autoscaler of the tier's pool (KEDA) reads.
DemandGauge = Callable[[str, str], Any]
Build = Callable[[Route], Awaitable[RequestT]]


class Router:
    """Calls the first upstream of a chain that answers: one fallback path for every RPC.

    Before the first event (of a stream) or the response (of a unary call): UNAVAILABLE or a
    timeout is retried on the same upstream with jittered exponential backoff, then the next
    tier is tried; RESOURCE_EXHAUSTED, and UNAVAILABLE from an upstream that will not serve the
    model now (MODEL_REMOTE, MANIFEST_SWITCHING), go to the next tier at once; an upstream whose
    breaker is open is skipped. A stream's first event is returned to the caller, and nothing is
    retried after it: the client may already have text.
    """

    def __init__(
        self,
        policy: RetryPolicy,
        on_upstream_error: UpstreamErrorHook | None = None,
        demand: DemandGauge | None = None,
    ) -> None:
        self._policy = policy
        self._on_error = on_upstream_error or (lambda tier, code: None)
        self._demand = demand

    async def open(
        self,
        chain: Sequence[Route],
        build: Build[inference_pb2.GenerateRequest],
        *,
        deadline: float,
        metadata: Metadata,
        attempts: Attempts,
        model: str = "",
    ) -> Opened:
        """A generation opened on the first route that streams an event. While a route is
        tried, and after it opened until `Opened.release`, the request counts in that route's
        demand for `model` (as the route names it)."""

        async def attempt(route: Route) -> Opened:
            request = await build(route)
            remaining = _remaining(deadline)
            call = route.call("Generate", request, timeout=remaining, metadata=metadata)
            # Inference services send their headers on receiving a request, before it queues:
            # with them, a late first token means a busy upstream, not a dead one. (Asked
            # before the wait ends: cancelling a read cancels the call, which ends both.)
            headers = asyncio.ensure_future(call.initial_metadata())
            reading = asyncio.ensure_future(call.read())
            try:
                done, _ = await asyncio.wait(
                    {reading}, timeout=min(remaining, self._policy.first_token_timeout_s)
                )
                alive = headers.done() and not headers.cancelled() and not headers.exception()
            except BaseException:
                reading.cancel()
                call.cancel()
                raise
            finally:
                headers.cancel()
            if not done:
                reading.cancel()
                call.cancel()
                self._on_error(route.tier_name, "FIRST_TOKEN_TIMEOUT")
                raise UpstreamFailure(
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    DeadlineExceeded(
                        f"no first token from {route.address} in time"
                        + (" (it has the request queued)" if alive else "")
                    ),
                    # A busy upstream is neither retried nor counted against its breaker: the
                    # next tier is tried at once, as for a full queue.
                    retry=not alive,
                )
            first = reading.result()
            if first is grpc.aio.EOF:
                raise UpstreamFailure(
                    grpc.StatusCode.UNAVAILABLE,
                    Unavailable(f"{route.address} ended the stream without an event"),
                    retry=True,
                )
            return Opened(route=route, call=call, first=first)

        held: _Held | None = None

        def hold(route: Route) -> Callable[[], None]:
            nonlocal held
            if self._demand is None:
                return _nothing
            held = _Held(self._demand(route.tier_name, route.model_for(model)))
            return held.release

        opened = await self._first(chain, attempt, attempts, hold)
        if held is not None:
            opened.release = held.release  # the route that opened: held until the request ends
        return opened

    async def unary(
        self,
        chain: Sequence[Route],
        method: UnaryRpc,
        build: Build[Any],
        *,
        deadline: float,
        metadata: Metadata,
        attempts: Attempts,
    ) -> Any:
        """The response of `method` from the first route that answers it."""

        async def attempt(route: Route) -> Any:
            request = await build(route)
            return await route.call(
                method, request, timeout=_remaining(deadline), metadata=metadata
            )

        return await self._first(chain, attempt, attempts)

    async def _first(
        self,
        chain: Sequence[Route],
        attempt: Callable[[Route], Awaitable[ResultT]],
        attempts: Attempts,
        hold: Callable[[Route], Callable[[], None]] | None = None,
    ) -> ResultT:
        last: SlmError | None = None
        retry_after: float | None = None
        # Upstreams that answered, and those of them that keep the model on a remote tier.
        answered = remote = 0
        for index, route in enumerate(chain):
            if not route.breaker.allow():
                attempts.decisions.append(f"breaker_open:{route.tier_name}:{route.address}")
                wait = route.breaker.retry_after_s()
                retry_after = wait if retry_after is None else min(retry_after, wait)
                continue
            if index > 0 or attempts.decisions:
                attempts.decisions.append(f"try:{route.tier_name}:{route.address}")
            release = hold(route) if hold is not None else None
            try:
                return await self._with_retries(route, attempt)
            except BaseException as error:
                if release is not None:
                    release()
                if not isinstance(error, UpstreamFailure):
                    raise
                last = error.error
                answered += 1
                if last.reason == "MODEL_REMOTE":
                    remote += 1
                attempts.decisions.append(
                    f"fallback:{route.tier_name}:{route.address}:{error.code.name}"
                )
        if last is not None and last.code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            raise last
        if last is not None and remote == answered == len(chain):
            # Not a passing outage: every tier of the route keeps the model elsewhere, and no
            # route sends it to a tier that serves it (a manifest and routing that disagree).
            raise NotFound(
                f"{last.message}, and no other tier of its route serves it "
                "(doorman.routing has no route for it to Tier B or C)",
                field="model",
                reason="MODEL_NOT_SERVED",
            )
        raise Unavailable(
            "no upstream could serve the request"
            + (f"; the last one said: {last.message}" if last is not None else ""),
            reason="NO_UPSTREAM",
            retry_after_s=max(1.0, retry_after or 1.0),
        )

    async def _with_retries(
        self, route: Route, attempt: Callable[[Route], Awaitable[ResultT]]
    ) -> ResultT:
        policy = self._policy
        cold = route.cold_start_wait_s > 0
        retrying = AsyncRetrying(
            stop=self._stop(route),
            wait=wait_exponential_jitter(
                multiplier=policy.initial_backoff_s,
                max=policy.max_backoff_s,
                jitter=policy.initial_backoff_s,
            ),
            retry=retry_if_exception(lambda e: isinstance(e, UpstreamFailure) and e.retry),
            reraise=True,
        )
        first_attempt = True
        try:
            async for retry in retrying:
                with retry:
                    # The breaker may have opened (or gone half-open) since the last attempt.
                    if not first_attempt and not route.breaker.allow():
                        raise UpstreamFailure(
                            grpc.StatusCode.UNAVAILABLE,
                            Unavailable("circuit open", reason="BREAKER"),
                            retry=False,
                        )
                    first_attempt = False
                    return await self._once(route, attempt, cold)
        except UpstreamFailure as failure:
            if cold and _absent(failure) and failure.retry:
                # Still absent when its cold-start wait ended: one failure for the request,
                # none for the attempts made while it may have been starting.
                route.breaker.failure()
            raise
        raise AssertionError("tenacity stops by raising")  # pragma: no cover

    def _stop(self, route: Route) -> Callable[[RetryCallState], bool]:
        """After policy.attempts; for an upstream with a cold-start wait that is absent
        (UNAVAILABLE), once that wait has passed instead."""
        attempts, wait_s = self._policy.attempts, route.cold_start_wait_s

        def stop(state: RetryCallState) -> bool:
            if wait_s > 0 and state.outcome is not None:
                failure = state.outcome.exception()
                if isinstance(failure, UpstreamFailure) and _absent(failure):
                    return (state.seconds_since_start or 0.0) >= wait_s
            return state.attempt_number >= attempts

        return stop

    async def _once(
        self,
        route: Route,
        attempt: Callable[[Route], Awaitable[ResultT]],
        starting: bool = False,
    ) -> ResultT:
        """One attempt, and its verdict for the route's breaker (none for an absent upstream
        that may be `starting`: its cold-start wait decides)."""
        try:
            result = await attempt(route)
        except grpc.aio.AioRpcError as error:
            self._on_error(route.tier_name, error.code().name)
            failure: BaseException = classify(error)
        except UpstreamFailure as raised:
            failure = raised
        except BaseException:
            # No verdict on the upstream (the client left, the request was refused first).
            route.breaker.abandon()
            raise
        else:
            route.breaker.success()
            return result
        if (
            isinstance(failure, UpstreamFailure)
            and failure.retry
            and not (starting and _absent(failure))
        ):
            route.breaker.failure()
        else:
            route.breaker.abandon()
        raise failure from None


class _Held:
    """One request's count in a route's demand gauge, given back once."""

    def __init__(self, gauge: Any) -> None:
        self._gauge: Any = gauge
        gauge.inc()

    def release(self) -> None:
        if self._gauge is not None:
            self._gauge.dec()
            self._gauge = None


def _absent(failure: UpstreamFailure) -> bool:
    """The upstream is not there (nothing listens, no endpoint), as opposed to slow or full."""
    return failure.code is grpc.StatusCode.UNAVAILABLE


def _remaining(deadline: float) -> float:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise DeadlineExceeded("the deadline passed before any upstream answered")
    return remaining


ROUTER_PROMPT = (
    "Classify the request below. Answer with exactly one of these intents and nothing else: "
    "{intents}.\n\nRequest:\n{text}"
)


@dataclass(frozen=True)
class _Constraint:
    logit_bias: Mapping[int, float]
    intent_by_piece: Mapping[str, str]


class IntentClassifier:
    """Asks a router model for an intent, its answer constrained to the manifest's intents.

    With Tokenize available upstream, every intent's first token gets a +100 logit bias and one
    greedy token is generated, so the answer can only be one of them; otherwise a few greedy
    tokens are matched against the intents. Anything that names no intent takes the fallback.
    """

    def __init__(self, router: Router) -> None:
        self._router = router
        self._constraints: dict[tuple[str, str, tuple[str, ...]], _Constraint | None] = {}

    async def classify(
        self,
        manifest: Manifest,
        chain: Sequence[Route],
        text_for: Callable[[Route], str],
        *,
        deadline: float,
        metadata: Metadata,
        attempts: Attempts,
    ) -> tuple[str | None, Route]:
        intents = tuple(manifest.intents)

        async def build(route: Route) -> inference_pb2.GenerateRequest:
            model = route.model_for(manifest.router_model)
            constraint = await self._constraint(route, model, intents)
            sampling = types_pb2.SamplingParams(temperature=0.0, stop=["\n"])
            if constraint is not None:
                sampling.max_tokens = 1
                sampling.logit_bias.update(constraint.logit_bias)
            else:
                sampling.max_tokens = 8
            prompt = ROUTER_PROMPT.format(intents=", ".join(intents), text=text_for(route))
            return inference_pb2.GenerateRequest(
                model=model,
                chat=types_pb2.ChatInput(
                    messages=[types_pb2.ChatMessage(role=types_pb2.ROLE_USER, content=prompt)]
                ),
                sampling=sampling,
            )

        opened = await self._router.open(
            chain,
            build,
            deadline=deadline,
            metadata=metadata,
            attempts=attempts,
            model=manifest.router_model,
        )
        try:
            answer = await _read_text(opened)
        finally:
            opened.release()
        route = opened.route
        constraint = self._constraints.get(
            (route.address, route.model_for(manifest.router_model), intents)
        )
        if constraint is not None and answer in constraint.intent_by_piece:
            return constraint.intent_by_piece[answer], route
        return _match_intent(answer, intents), route

    async def _constraint(
        self, route: Route, model: str, intents: tuple[str, ...]
    ) -> _Constraint | None:
        key = (route.address, model, intents)
        if key in self._constraints:
            return self._constraints[key]
        try:
            firsts: dict[int, str] = {}
            for intent in intents:
                tokens = await route.call(
                    "Tokenize",
                    inference_pb2.TokenizeRequest(model=model, text=intent, add_special=False),
                    timeout=10,
                )
                if not tokens.tokens or tokens.tokens[0] in firsts:
                    # Intents that share a first token cannot be told apart by one token.
                    firsts = {}
                    break
                firsts[tokens.tokens[0]] = intent
            pieces: dict[str, str] = {}
            for token, intent in firsts.items():
                piece = await route.call(
                    "Detokenize",
                    inference_pb2.DetokenizeRequest(model=model, tokens=[token]),
                    timeout=10,
                )
                pieces[piece.text] = intent
        except grpc.aio.AioRpcError as error:
            if isinstance(classify(error), UpstreamFailure):
                raise  # the upstream is down or full: let routing retry or fall back, cache nothing
            firsts, pieces = {}, {}
        constraint = (
            _Constraint({token: 100.0 for token in firsts}, pieces)
            if firsts and len(pieces) == len(firsts)
            else None
        )
        self._constraints[key] = constraint
        return constraint


def _match_intent(answer: str, intents: Sequence[str]) -> str | None:
    cleaned = answer.strip().strip("\"'`.*").lower()
    for intent in sorted(intents, key=len, reverse=True):
        if cleaned.startswith(intent.lower()):
            return intent
    return None


async def _read_text(opened: Opened) -> str:
    parts: list[str] = []
    message = opened.first
    try:
        while message is not grpc.aio.EOF:
            if message.HasField("delta"):
                parts.append(message.delta.text)
            message = await opened.call.read()
    except grpc.aio.AioRpcError as error:
        raise from_rpc_error(error) from None
    finally:
        opened.call.cancel()
    return "".join(parts)
