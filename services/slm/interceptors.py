"""Server interceptor: request id into the log context, SlmError into gRPC status, RPC metrics."""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram

from slm.errors import Internal, SlmError, to_grpc_status
from slm.logs import request_id_var

log = logging.getLogger(__name__)

REQUEST_ID_HEADER = "x-request-id"


class RpcMetrics:
    """Per-RPC counters and latency histograms of one service."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.handled = Counter(
            "slm_grpc_server_handled",
            "RPCs completed, by method and status code.",
            ["method", "code"],
            registry=registry,
        )
        self.seconds = Histogram(
            "slm_grpc_server_handling_seconds",
            "Time from the start of an RPC to its end (whole stream for streaming RPCs).",
            ["method"],
            registry=registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )


def _request_id(details: grpc.HandlerCallDetails) -> str:
    for key, value in details.invocation_metadata or ():
        if key == REQUEST_ID_HEADER and isinstance(value, str) and value:
            return value[:128]
    return uuid.uuid4().hex


async def _abort(context: grpc.aio.ServicerContext[Any, Any], error: BaseException) -> None:
    if not isinstance(error, SlmError):
        # A server fault: log it with its traceback here, tell the client nothing internal.
        log.error("unhandled error", exc_info=error)
        error = Internal("internal error")
    status = to_grpc_status(error)
    await context.abort(status.code, status.details, status.trailing_metadata)


class ErrorInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Maps exceptions to status in one place, so servicers just raise SlmError."""

    def __init__(self, metrics: RpcMetrics) -> None:
        self._metrics = metrics

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method.rsplit("/", 1)[-1]
        request_id = _request_id(handler_call_details)
        metrics = self._metrics

        def finish(start: float, code: grpc.StatusCode) -> None:
            metrics.handled.labels(method, code.name).inc()
            metrics.seconds.labels(method).observe(time.perf_counter() - start)

        if handler.unary_unary is not None:
            unary = handler.unary_unary

            async def unary_behavior(
                request: Any, context: grpc.aio.ServicerContext[Any, Any]
            ) -> Any:
                request_id_var.set(request_id)
                start = time.perf_counter()
                code = grpc.StatusCode.OK
                try:
                    return await unary(request, context)
                except asyncio.CancelledError:
                    code = grpc.StatusCode.CANCELLED
                    raise
                except grpc.aio.AbortError:
                    code = context.code() or grpc.StatusCode.UNKNOWN
                    raise
                except Exception as error:
                    code = error.code if isinstance(error, SlmError) else grpc.StatusCode.INTERNAL
                    await _abort(context, error)
                finally:
                    finish(start, code)

            return grpc.unary_unary_rpc_method_handler(
                unary_behavior,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            stream = handler.unary_stream

            async def stream_behavior(
                request: Any, context: grpc.aio.ServicerContext[Any, Any]
            ) -> AsyncIterator[Any]:
                request_id_var.set(request_id)
                start = time.perf_counter()
                code = grpc.StatusCode.OK
                try:
                    if inspect.isasyncgenfunction(stream):
                        async for response in stream(request, context):
                            yield response
                    else:
                        # Handlers that write with context.write() (grpc's health Watch).
                        await stream(request, context)
                except grpc.aio.AbortError:
                    code = context.code() or grpc.StatusCode.UNKNOWN
                    raise
                except (asyncio.CancelledError, GeneratorExit):
                    code = grpc.StatusCode.CANCELLED
                    raise
                except Exception as error:
                    code = error.code if isinstance(error, SlmError) else grpc.StatusCode.INTERNAL
                    await _abort(context, error)
                finally:
                    finish(start, code)

            return grpc.unary_stream_rpc_method_handler(
                stream_behavior,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler
