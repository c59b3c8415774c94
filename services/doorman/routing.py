"""Tier routing: model -> chain of upstreams; retries and fallback before the first token."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from tenacity import (
    AsyncRetrying,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential_jitter,
)

from doorman.breaker import CircuitBreaker
from slm.errors import DeadlineExceeded, SlmError, Unavailable, from_rpc_error
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

    def model_for(self, requested: str) -> str:
        return self.model or requested

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


@dataclass
class Opened:
    """A generation that has produced its first event on `route`; the rest is read from `call`."""

    route: Route
    call: Any  # grpc.aio.UnaryStreamCall; grpc ships no types
    first: inference_pb2.GenerateResponse


class _Retryable(Exception):
    def __init__(self, code: grpc.StatusCode, error: SlmError) -> None:
        super().__init__(error.message)
        self.code = code
        self.error = error


class _FallBack(Exception):
    def __init__(self, code: grpc.StatusCode, error: SlmError) -> None:
        super().__init__(error.message)
        self.code = code
        self.error = error


@dataclass
class Attempts:
    """What routing decided for one request, for the ledger and the client's StreamEnd."""

    decisions: list[str] = field(default_factory=list)


UpstreamErrorHook = Callable[[str, str], None]


class Router:
    """Opens a generation on the first upstream of a chain that answers.

    Before the first event: UNAVAILABLE or a timeout is retried on the same upstream with
    jittered exponential backoff, then the next tier is tried. The first event is returned to
    the caller, and nothing is retried after it: the client may already have text.
    """

    def __init__(
        self, policy: RetryPolicy, on_upstream_error: UpstreamErrorHook | None = None
    ) -> None:
        self._policy = policy
        self._on_error = on_upstream_error or (lambda tier, code: None)

    async def open(
        self,
        chain: Sequence[Route],
        build: Callable[[Route], Awaitable[inference_pb2.GenerateRequest]],
        *,
        deadline: float,
        metadata: tuple[tuple[str, str], ...],
        attempts: Attempts,
    ) -> Opened:
        last: SlmError | None = None
        retry_after: float | None = None
        for index, route in enumerate(chain):
            if not route.breaker.allow():
                attempts.decisions.append(f"breaker_open:{route.tier_name}:{route.address}")
                wait = route.breaker.retry_after_s()
                retry_after = wait if retry_after is None else min(retry_after, wait)
                continue
            if index > 0 or attempts.decisions:
                attempts.decisions.append(f"try:{route.tier_name}:{route.address}")
            try:
                return await self._open_with_retries(route, build, deadline, metadata)
            except _FallBack as failure:
                last = failure.error
                attempts.decisions.append(
                    f"fallback:{route.tier_name}:{route.address}:{failure.code.name}"
                )
        if last is not None and last.code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            raise last
        raise Unavailable(
            "no upstream could serve the request"
            + (f"; the last one said: {last.message}" if last is not None else ""),
            reason="NO_UPSTREAM",
            retry_after_s=max(1.0, retry_after or 1.0),
        )

    async def _open_with_retries(
        self,
        route: Route,
        build: Callable[[Route], Awaitable[inference_pb2.GenerateRequest]],
        deadline: float,
        metadata: tuple[tuple[str, str], ...],
    ) -> Opened:
        policy = self._policy
        retrying = AsyncRetrying(
            stop=stop_after_attempt(policy.attempts),
            wait=wait_exponential_jitter(
                multiplier=policy.initial_backoff_s,
                max=policy.max_backoff_s,
                jitter=policy.initial_backoff_s,
            ),
            retry=retry_if_exception(lambda e: isinstance(e, _Retryable)),
            reraise=True,
        )
        first_attempt = True
        try:
            async for attempt in retrying:
                with attempt:
                    # The breaker may have opened (or gone half-open) since the last attempt.
                    if not first_attempt and not route.breaker.allow():
                        raise _FallBack(
                            grpc.StatusCode.UNAVAILABLE,
                            Unavailable("circuit open", reason="BREAKER"),
                        )
                    first_attempt = False
                    request = await self._build(route, build)
                    return await self._attempt(route, request, deadline, metadata)
        except _Retryable as failure:
            raise _FallBack(failure.code, failure.error) from None
        raise AssertionError("tenacity stops by raising")  # pragma: no cover

    async def _build(
        self, route: Route, build: Callable[[Route], Awaitable[inference_pb2.GenerateRequest]]
    ) -> inference_pb2.GenerateRequest:
        # Building may call the upstream too (the intent classifier tokenizes there).
        try:
            return await build(route)
        except grpc.aio.AioRpcError as error:
            code = error.code()
            self._on_error(route.tier_name, code.name)
            if code in _RETRY_CODES:
                route.breaker.failure()
                raise _Retryable(code, from_rpc_error(error)) from None
            route.breaker.abandon()
            raise from_rpc_error(error) from None
        except BaseException:
            route.breaker.abandon()
            raise

    async def _attempt(
        self,
        route: Route,
        request: inference_pb2.GenerateRequest,
        deadline: float,
        metadata: tuple[tuple[str, str], ...],
    ) -> Opened:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            route.breaker.abandon()
            raise DeadlineExceeded("the deadline passed before any upstream answered")
        call = route.stub.Generate(request, timeout=remaining, metadata=metadata)
        try:
            first = await asyncio.wait_for(
                call.read(), min(remaining, self._policy.first_token_timeout_s)
            )
        except TimeoutError:
            call.cancel()
            route.breaker.failure()
            self._on_error(route.tier_name, "FIRST_TOKEN_TIMEOUT")
            raise _Retryable(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                DeadlineExceeded(f"no first token from {route.address} in time"),
            ) from None
        except grpc.aio.AioRpcError as error:
            code = error.code()
            self._on_error(route.tier_name, code.name)
            failure = from_rpc_error(error)
            if code in _RETRY_CODES:
                route.breaker.failure()
                raise _Retryable(code, failure) from None
            route.breaker.abandon()
            if code in _FALLBACK_CODES:
                raise _FallBack(code, failure) from None
            raise failure from None
        except BaseException:
            call.cancel()
            route.breaker.abandon()
            raise
        if first is grpc.aio.EOF:
            route.breaker.failure()
            raise _Retryable(
                grpc.StatusCode.UNAVAILABLE,
                Unavailable(f"{route.address} ended the stream without an event"),
            )
        route.breaker.success()
        return Opened(route=route, call=call, first=first)


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
        metadata: tuple[tuple[str, str], ...],
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
            chain, build, deadline=deadline, metadata=metadata, attempts=attempts
        )
        answer = await _read_text(opened)
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
                tokens = await route.stub.Tokenize(
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
                piece = await route.stub.Detokenize(
                    inference_pb2.DetokenizeRequest(model=model, tokens=[token]), timeout=10
                )
                pieces[piece.text] = intent
        except grpc.aio.AioRpcError as error:
            if error.code() in _FALLBACK_CODES:
                raise  # the upstream is down: let routing retry or fall back, cache nothing
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
