"""The gateway's FastAPI app factory, its HTTP routes, and how to serve it with uvicorn."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import slm
from gateway import errors, protocol
from gateway.admin import admin_router
from gateway.admission import Admission, Generations, StalledEndFilter
from gateway.anthropic import routes as anthropic_routes
from gateway.channels import Channels, install_channels
from gateway.config import GENERATION_PATHS, GatewaySettings
from gateway.embeddings import embeddings_router
from gateway.files import Documents, files_router
from gateway.responses import routes as responses_routes
from gateway.serving import CallContext, GatewayMetrics, OpenAIServing, call_metadata
from gateway.ui_routes import install_ui
from slm.logs import request_id_var
from slm.server import run_process

log = logging.getLogger(__name__)

_REQUEST_ID = "slm.request_id"
_STARTED = "slm.started"
_UNMATCHED = "unmatched"


class _EdgeMiddleware:
    """Per request: the request id (Envoy's, or a new one), its response header, and metrics.

    A plain ASGI middleware, because Starlette's BaseHTTPMiddleware would buffer and re-task
    every streamed chunk.
    """

    def __init__(self, app: ASGIApp, metrics: GatewayMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        request_id = ""
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                request_id = value.decode("latin-1")
                break
        if not request_id:
            request_id = uuid.uuid4().hex
        scope[_REQUEST_ID] = request_id
        scope[_STARTED] = started
        id_header = (b"x-request-id", request_id.encode("latin-1"))
        status = 500
        responded = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, responded
            if message["type"] == "http.response.start":
                status, responded = message["status"], True
                message["headers"] = [*message.get("headers", ()), id_header]
            await send(message)

        token = request_id_var.set(request_id)
        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            # Answered here, not by Starlette's ServerErrorMiddleware: that one re-raises after
            # its 500, and uvicorn then closes the connection, which Envoy may already have
            # given the next request (a 503 for a request that did nothing wrong).
            log.exception("unhandled error")
            if responded:
                raise  # the response is cut short: closing the connection is how it shows
            await errors.internal().response()(scope, receive, send_with_id)
        finally:
            request_id_var.reset(token)
            route = getattr(scope.get("route"), "path", _UNMATCHED)
            self.metrics.requests.labels(route, scope["method"], str(status)).inc()
            self.metrics.duration.labels(route).observe(time.perf_counter() - started)


class _Runtime:
    """What exists only between startup and shutdown: the serving machinery over the Doorman."""

    serving: OpenAIServing | None = None

    def require(self) -> OpenAIServing:
        if self.serving is None:
            raise RuntimeError("the gateway is not started: its lifespan has not run")
        return self.serving


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it is known to exceed `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, f"The request body exceeds {limit} bytes.")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPException(413, f"The request body exceeds {limit} bytes.")
        chunks.append(chunk)
    return b"".join(chunks)


def _context(request: Request, route: str) -> CallContext:
    scope = request.scope
    request_id: str = scope[_REQUEST_ID]
    authorization = request.headers.get("authorization")
    if not authorization and (key := request.headers.get("x-api-key")):
        # Anthropic's clients send the key this way; the Doorman reads one form.
        authorization = f"Bearer {key}"
    return CallContext(
        request_id=request_id,
        metadata=call_metadata(request_id, authorization, request.headers.get("cache-control")),
        receive=request.receive,
        started=scope[_STARTED],
        route=route,
    )


def _request_body_doc(model: type[BaseModel]) -> dict[str, Any]:
    schema = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def _error_docs(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {status: {"model": protocol.ErrorResponse} for status in statuses}


_GENERATION_ERRORS = _error_docs(400, 401, 403, 404, 413, 429, 500, 503, 504)


def build_app(settings: GatewaySettings) -> FastAPI:
    """Build the gateway: routes, error handlers, metrics. At startup it opens one Connector
    (from the settings' discovery section) that every gRPC call of the gateway goes through."""
    registry = CollectorRegistry()
    metrics = GatewayMetrics(registry)
    runtime = _Runtime()
    limit = settings.gateway.max_body_bytes
    max_n = settings.gateway.max_n
    documents = Documents(settings.gateway, _context)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with Channels.open(settings) as channels:
            runtime.serving = OpenAIServing(channels.doorman_channel, metrics)
            install_channels(app, channels)
            log.info("gateway started", extra={"doorman": settings.gateway.doorman})
            try:
                yield
            finally:
                runtime.serving = None
                install_channels(app, None)
        log.info("gateway stopped")

    app = FastAPI(
        title="service-slm gateway",
        description="OpenAI-compatible REST API of service-slm, served by its Doorman.",
        version=slm.__version__,
        lifespan=lifespan,
    )

    @app.post(
        "/v1/chat/completions",
        responses={
            200: {"model": protocol.ChatCompletion, "content": {"text/event-stream": {}}},
            **_GENERATION_ERRORS,
        },
        openapi_extra=_request_body_doc(protocol.ChatCompletionRequest),
    )
    async def chat_completions(request: Request) -> Response:
        """Generate the next message of a conversation, streamed as SSE when `stream` is true."""
        try:
            body = await documents.parse(
                request,
                "/v1/chat/completions",
                await _read_body(request, limit),
                lambda raw, files: protocol.parse_chat(raw, max_n, files),
            )
        except protocol.RequestInvalid as error:
            return errors.invalid_request(error.message, error.param).response()
        return await runtime.require().chat(body, _context(request, "/v1/chat/completions"))

    @app.post(
        "/v1/completions",
        responses={
            200: {"model": protocol.Completion, "content": {"text/event-stream": {}}},
            **_GENERATION_ERRORS,
        },
        openapi_extra=_request_body_doc(protocol.CompletionRequest),
    )
    async def completions(request: Request) -> Response:
        """Continue a raw prompt, streamed as SSE when `stream` is true."""
        try:
            body = protocol.parse_completion(await _read_body(request, limit), max_n)
        except protocol.RequestInvalid as error:
            return errors.invalid_request(error.message, error.param).response()
        return await runtime.require().complete(body, _context(request, "/v1/completions"))

    @app.get(
        "/v1/models",
        responses={200: {"model": protocol.ModelList}, **_error_docs(401, 403, 500, 503)},
    )
    async def models(request: Request) -> Response:
        """The models the caller may use."""
        return await runtime.require().models(_context(request, "/v1/models"))

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        """Liveness: answers while the process runs."""
        return {"status": "ok"}

    @app.get("/readyz", responses={503: {"description": "The Doorman is not serving."}})
    async def readyz() -> Response:
        """Readiness: 200 only while the Doorman reports SERVING."""
        serving = runtime.serving
        if serving is not None and await serving.ready():
            return JSONResponse({"status": "ready"})
        return JSONResponse({"status": "unavailable"}, status_code=503)

    # Not in the public document: Prometheus scrapes this port inside the cluster, and the
    # edge (Envoy), through which clients read the document, answers /metrics with 404.
    @app.get("/metrics", response_class=Response, include_in_schema=False)
    async def prometheus() -> Response:
        """Prometheus metrics of this gateway process."""
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/version")
    async def version() -> dict[str, str]:
        """The service-slm version this gateway runs."""
        return {"version": slm.__version__}

    async def read_body(request: Request) -> bytes:
        return await _read_body(request, limit)

    app.include_router(
        anthropic_routes.messages_router(runtime.require, read_body, _context, documents)
    )
    app.include_router(
        responses_routes.responses_router(runtime.require, read_body, _context, documents)
    )
    generations = Generations(settings.gateway.max_concurrent_requests)
    install_ui(app, runtime.require, limit, generations)
    app.include_router(admin_router(settings.gateway, registry))
    app.include_router(embeddings_router(read_body, _context))
    app.include_router(files_router(documents, _read_body))
    _install_error_handlers(app)
    _install_openapi(app)
    generation = {
        path: route
        for route in app.routes
        if (path := getattr(route, "path", None)) in GENERATION_PATHS
    }
    app.add_middleware(
        Admission,
        generations=generations,
        stall_timeout_s=settings.gateway.stall_timeout_s,
        routes=generation,
    )
    # Outermost: every answer, refusals included, carries the request id and is counted.
    app.add_middleware(_EdgeMiddleware, metrics=metrics)
    return app


def _install_error_handlers(app: FastAPI) -> None:
    """Every error the HTTP layer raises answers in OpenAI's shape, too."""

    async def http_error(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        code = "request_too_large" if exc.status_code == 413 else None
        return errors.for_status(exc.status_code, str(exc.detail), code).response(exc.headers)

    async def refusal(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, errors.Refusal)
        return exc.error.response()

    async def validation_error(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        loc = tuple(first["loc"])
        # FastAPI says where a parameter was ("query", "path", ...); clients name it alone.
        if loc and loc[0] in ("query", "path", "header", "cookie"):
            loc = loc[1:]
        param = protocol.error_param(loc)
        message = f"Invalid value for '{param}': {first['msg']}." if param else str(first["msg"])
        return errors.invalid_request(message, param).response()

    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(errors.Refusal, refusal)
    app.add_exception_handler(RequestValidationError, validation_error)


def _install_openapi(app: FastAPI) -> None:
    """Add the request bodies' schemas, which the routes parse themselves for speed."""
    default = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = default()
            _, defs = models_json_schema(
                [
                    (model, "validation")
                    for model in (
                        protocol.ChatCompletionRequest,
                        protocol.CompletionRequest,
                        *anthropic_routes.REQUEST_MODELS,
                        *responses_routes.REQUEST_MODELS,
                    )
                ],
                ref_template="#/components/schemas/{model}",
            )
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            components.update(defs.get("$defs", {}))
            # FastAPI documents a 422 for every validated parameter; this gateway answers 400.
            for operations in schema["paths"].values():
                for operation in operations.values():
                    operation.get("responses", {}).pop("422", None)
            for unused in ("HTTPValidationError", "ValidationError"):
                components.pop(unused, None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


class _Server(uvicorn.Server):
    """uvicorn's server without its own signal handling, which re-raises the signal after
    shutdown and so would kill a caller that wants to carry on (e.g. to stop other parts)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def uvicorn_config(settings: GatewaySettings, *, grace_s: int = 30) -> uvicorn.Config:
    """uvicorn's settings for the gateway: httptools, no access log (Envoy's is). The event
    loop is the process's (`slm.server.run_process`: uvloop), which `serve_gateway` runs on."""
    return uvicorn.Config(
        build_app(settings),
        host=settings.gateway.host,
        port=settings.gateway.port,
        http="httptools",
        lifespan="on",
        log_config=None,
        access_log=False,
        server_header=False,
        # Longer than Envoy's upstream idle timeout, so Envoy never reuses a connection uvicorn
        # has just closed.
        timeout_keep_alive=75,
        # Generation streams can run for minutes; after this, shutdown cuts them.
        timeout_graceful_shutdown=grace_s,
    )


async def serve_gateway(settings: GatewaySettings, *, grace_s: int = 30) -> None:
    """Serve the gateway until SIGTERM or SIGINT, then drain in-flight requests and return.

    Runs on the caller's event loop; `run_gateway` starts one on uvloop.
    """
    server = _Server(uvicorn_config(settings, grace_s=grace_s))
    loop = asyncio.get_running_loop()
    installed: list[signal.Signals] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        # Signals can only be handled on the main thread; elsewhere the caller stops us.
        with contextlib.suppress(ValueError, RuntimeError, NotImplementedError):
            loop.add_signal_handler(sig, server.handle_exit, sig, None)
            installed.append(sig)
    stalled_ends = StalledEndFilter()
    logging.getLogger("uvicorn.error").addFilter(stalled_ends)
    try:
        await server.serve()
    finally:
        logging.getLogger("uvicorn.error").removeFilter(stalled_ends)
        for sig in installed:
            loop.remove_signal_handler(sig)


def run_gateway(settings: GatewaySettings) -> None:
    """Blocking entry point: serve_gateway on a uvloop event loop when uvloop is installed."""
    from slm import telemetry

    # Like every gRPC service (mesh.cli.serve_grpc); FastAPI's own instrumentation then makes
    # the HTTP request the root span of its trace.
    telemetry.setup_tracing("gateway", settings.telemetry)
    run_process(serve_gateway(settings))
