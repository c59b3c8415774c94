"""How many generations the gateway runs at once, and how long a client may leave its answer
untaken: one count for the HTTP routes and the chat WebSocket."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from contextvars import ContextVar

from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway import errors

log = logging.getLogger(__name__)

# Set in the task of a request the gateway ended because its client stalled; never reset, so
# that uvicorn's own log line after the app returns (same task) still sees it.
_ENDED_STALLED: ContextVar[bool] = ContextVar("slm_ended_stalled", default=False)
_INCOMPLETE = "ASGI callable returned without completing response"


class ClientStalled(TimeoutError):
    """The client took no response bytes for the stall timeout; its request is ended.

    A TimeoutError, so an OSError: the SSE response treats it as the client leaving, closing
    its Doorman call (the engine frees the slot within a step)."""


class Generations:
    """The generations running in this gateway, up to `limit`; one more is refused with
    `refusal` (429, Retry-After) before anything of it is read."""

    def __init__(self, limit: int, retry_after_s: int = 1) -> None:
        self.limit = limit
        self.in_flight = 0
        self.refusal = errors.HttpError(
            429,
            f"The gateway is serving its limit of {limit} concurrent generations; "
            f"retry after {retry_after_s} s.",
            errors.RATE_LIMIT,
            code="overloaded",
            retry_after_s=retry_after_s,
        )

    def try_take(self) -> bool:
        if self.in_flight >= self.limit:
            return False
        self.in_flight += 1
        return True

    def release(self) -> None:
        self.in_flight -= 1


class Admission:
    """Generation requests beyond the limit are refused with 429 before their body is read, and
    a response write (HTTP or WebSocket) that the client does not take within `stall_timeout_s`
    ends its request.

    Envoy refuses at its own limit first (in C++); this is the limit for what reaches the
    gateway, exact where Envoy's lets a burst's connecting requests through, and the one for
    callers that reach the gateway directly. The chat WebSocket takes its slots from the same
    `Generations`, one per request it streams.
    """

    def __init__(
        self,
        app: ASGIApp,
        generations: Generations,
        stall_timeout_s: float,
        routes: Mapping[str, BaseRoute],
    ) -> None:
        self.app = app
        self.generations = generations
        self.stall_timeout_s = stall_timeout_s
        # The generation paths and their routes, so a refusal is counted under its route.
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        bounded = self._bounded(send)
        route = self.routes.get(scope["path"])
        if scope["type"] == "websocket" or route is None or scope["method"] != "POST":
            await self.app(scope, receive, bounded)
            return
        if not self.generations.try_take():
            scope["route"] = route
            await self.generations.refusal.response()(scope, receive, bounded)
            return
        try:
            await self.app(scope, receive, bounded)
        finally:
            self.generations.release()

    def _bounded(self, send: Send) -> Send:
        timeout = self.stall_timeout_s

        async def bounded(message: Message) -> None:
            # uvicorn's send waits only while the socket's buffer is full (the client is not
            # reading); the timer costs a heap entry per chunk otherwise.
            try:
                async with asyncio.timeout(timeout):
                    await send(message)
            except TimeoutError:
                log.warning(
                    "the client took no response bytes for %s s: ending its request", timeout
                )
                _ENDED_STALLED.set(True)
                raise ClientStalled(f"the client took nothing for {timeout} s") from None

        return bounded


class StalledEndFilter(logging.Filter):
    """Drops uvicorn's ERROR "ASGI callable returned without completing response" for a
    response the gateway ended on purpose because its client stalled (already logged as a
    warning): closing the connection is the end it meant. Any other incomplete response still
    logs its error."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (_ENDED_STALLED.get() and record.getMessage().startswith(_INCOMPLETE))


__all__ = ["Admission", "ClientStalled", "Generations", "StalledEndFilter"]
