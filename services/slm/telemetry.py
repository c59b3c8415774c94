"""OpenTelemetry: gRPC instrumentation and the OTLP exporter, both on when tracing is configured.

With no exporter, spans would be recorded nowhere, yet the interceptors still cost about 0.3 ms
per hop on a 2-core machine (measured with bench-style loops), so they are only installed when
tracing is on. Turn it on for the whole mesh at once so the trace context crosses every hop.
"""

from __future__ import annotations

import logging
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from slm.config import TelemetryConfig

log = logging.getLogger(__name__)


def setup_tracing(service: str, config: TelemetryConfig) -> TracerProvider | None:
    """Install a tracer provider exporting over OTLP, or leave the no-op one in place."""
    if not config.otlp_endpoint:
        return None
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    provider.add_span_processor(
        BatchSpanProcessor(OTLPSpanExporter(endpoint=config.otlp_endpoint, insecure=True))
    )
    trace.set_tracer_provider(provider)
    log.info("tracing to %s", config.otlp_endpoint)
    return provider


def enabled(config: TelemetryConfig) -> bool:
    return bool(config.otlp_endpoint)


def server_interceptors(config: TelemetryConfig) -> list[Any]:
    if not enabled(config):
        return []
    from opentelemetry.instrumentation.grpc import aio_server_interceptor

    return [aio_server_interceptor()]  # type: ignore[no-untyped-call]


def client_interceptors(config: TelemetryConfig) -> list[Any]:
    if not enabled(config):
        return []
    from opentelemetry.instrumentation.grpc import aio_client_interceptors

    return list(aio_client_interceptors())  # type: ignore[no-untyped-call]
