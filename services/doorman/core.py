"""The Doorman's core: forwards a generation to its tier, times it and records it in the ledger.

It passes the upstream's protobuf messages through rather than converting each token chunk:
the Doorman sits on the hot path of every token, and copying would only add latency.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from slm.errors import SlmError, Unavailable, from_rpc_error
from slm.v1 import inference_pb2, inference_pb2_grpc, ledger_pb2, ledger_pb2_grpc, types_pb2

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


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


@dataclass(frozen=True)
class Upstream:
    tier: types_pb2.Tier.ValueType
    address: str
    stub: inference_pb2_grpc.InferenceServiceStub


@dataclass
class CallInfo:
    """What the caller told us about the call: who, which request, how long it may take."""

    request_id: str
    operation: str
    tenant: str = "anonymous"
    timeout_s: float | None = None


class Doorman:
    def __init__(
        self,
        local: Upstream,
        ledger: ledger_pb2_grpc.LedgerServiceStub,
        metrics: DoormanMetrics,
        default_timeout_s: float,
    ) -> None:
        self._local = local
        self._ledger = ledger
        self._metrics = metrics
        self._default_timeout_s = default_timeout_s
        self._pending: set[asyncio.Task[None]] = set()

    async def list_models(self) -> list[types_pb2.ModelInfo]:
        try:
            response = await self._local.stub.ListModels(
                inference_pb2.ListModelsRequest(), timeout=10
            )
        except grpc.aio.AioRpcError as error:
            raise from_rpc_error(error) from None
        return list(response.models)

    async def generate(
        self, request: inference_pb2.GenerateRequest, call: CallInfo
    ) -> AsyncIterator[inference_pb2.GenerateResponse]:
        """Stream the upstream's events; the final `end` carries the tier and upstream."""
        upstream = self._local
        tier_label = types_pb2.Tier.Name(upstream.tier)
        started = time.perf_counter()
        timeout = min(call.timeout_s or self._default_timeout_s, self._default_timeout_s)
        ttft: float | None = None
        end: types_pb2.StreamEnd | None = None
        code = grpc.StatusCode.OK
        self._metrics.in_flight.inc()
        rpc = upstream.stub.Generate(
            request, timeout=timeout, metadata=(("x-request-id", call.request_id),)
        )
        try:
            async for response in rpc:
                if ttft is None:
                    ttft = time.perf_counter() - started
                if response.HasField("end"):
                    end = response.end
                    end.tier = upstream.tier
                    end.upstream = upstream.address
                yield response
        except grpc.aio.AioRpcError as error:
            code = error.code()
            self._metrics.upstream_errors.labels(tier_label, code.name).inc()
            failure = from_rpc_error(error)
            if code == grpc.StatusCode.CANCELLED:
                failure = Unavailable("the upstream cancelled the generation", retry_after_s=1)
            raise failure from None
        except SlmError as error:
            code = error.code
            raise
        except (asyncio.CancelledError, GeneratorExit):
            code = grpc.StatusCode.CANCELLED
            raise
        finally:
            rpc.cancel()
            self._metrics.in_flight.dec()
            latency = time.perf_counter() - started
            self._observe(request.model, tier_label, code, ttft, latency, end)
            self._record(request, call, upstream, code, ttft, latency, end)

    def _observe(
        self,
        model: str,
        tier: str,
        code: grpc.StatusCode,
        ttft: float | None,
        latency: float,
        end: types_pb2.StreamEnd | None,
    ) -> None:
        self._metrics.requests.labels(model, tier, code.name).inc()
        self._metrics.latency.labels(model, tier).observe(latency)
        if ttft is not None:
            self._metrics.ttft.labels(model, tier).observe(ttft)
        if end is not None:
            self._metrics.tokens_in.labels(model, tier).inc(end.usage.prompt_tokens)
            self._metrics.tokens_out.labels(model, tier).inc(end.usage.completion_tokens)

    def _record(
        self,
        request: inference_pb2.GenerateRequest,
        call: CallInfo,
        upstream: Upstream,
        code: grpc.StatusCode,
        ttft: float | None,
        latency: float,
        end: types_pb2.StreamEnd | None,
    ) -> None:
        now = Timestamp()
        now.GetCurrentTime()
        entry = ledger_pb2.LedgerEntry(
            request_id=call.request_id,
            time=now,
            tenant=call.tenant,
            model=request.model,
            tier=upstream.tier,
            upstream=upstream.address,
            ttft_ms=(ttft or 0.0) * 1000,
            latency_ms=latency * 1000,
            status_code=code.value[0],
            operation=call.operation,
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
        task = asyncio.get_running_loop().create_task(self._append(entry))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _append(self, entry: ledger_pb2.LedgerEntry) -> None:
        try:
            await self._ledger.Append(ledger_pb2.AppendRequest(entry=entry), timeout=10)
        except grpc.aio.AioRpcError as error:
            self._metrics.ledger_errors.inc()
            log.error(
                "ledger append failed",
                extra={"code": error.code().name, "ledger_request_id": entry.request_id},
            )

    async def drain(self) -> None:
        """Wait for ledger writes still in flight; called on shutdown."""
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)
