"""The chat UI and admin page as static files, and chat streaming over a WebSocket."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import grpc
from fastapi import FastAPI, Request, WebSocket
from pydantic import ValidationError
from starlette.responses import Response
from starlette.websockets import WebSocketDisconnect

from gateway import errors, protocol
from gateway.admission import Generations
from gateway.serving import SSE_DONE, CallContext, OpenAIServing, call_metadata
from slm.logs import request_id_var

log = logging.getLogger(__name__)

UI_DIR = Path(__file__).parent / "ui"
WS_ROUTE = "/v1/chat/completions/ws"
DONE_FRAME = "[DONE]"

_MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}
# Everything the pages load comes from this origin: no CDN, no inline script.
_SECURITY_HEADERS = {
    "content-security-policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cache-control": "no-cache",
}
# Close codes (RFC 6455): the client broke the protocol; a message too big to process.
_POLICY_VIOLATION = 1008
_TOO_BIG = 1009


@dataclass(frozen=True, slots=True)
class Asset:
    """One static file, read once when the app is built."""

    body: bytes
    media_type: str
    etag: str

    def response(self, request: Request) -> Response:
        headers = {**_SECURITY_HEADERS, "etag": self.etag}
        if request.headers.get("if-none-match") == self.etag:
            return Response(status_code=304, headers=headers)
        return Response(self.body, media_type=self.media_type, headers=headers)


def load_assets(directory: Path) -> dict[str, Asset]:
    """The UI's files by name; only these are ever served, so no path reaches the disk."""
    assets: dict[str, Asset] = {}
    for path in sorted(directory.iterdir()):
        media_type = _MEDIA_TYPES.get(path.suffix)
        if media_type is None or not path.is_file():
            continue
        body = path.read_bytes()
        etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
        assets[path.name] = Asset(body, media_type, etag)
    return assets


def sse_payload(event: bytes) -> str:
    """The JSON (or `[DONE]`) inside one SSE event: WebSocket frames carry exactly that."""
    return event.removeprefix(b"data: ").removesuffix(b"\n\n").decode()


def same_origin(headers: Mapping[str, str]) -> bool:
    """Browsers send Origin on WebSockets; a page from another site must not use the mesh
    through a visitor's browser. Clients that are not browsers send no Origin."""
    origin = headers.get("origin")
    if origin is None:
        return True
    return urlsplit(origin).netloc == headers.get("host", "")


def parse_ws_request(text: str) -> tuple[protocol.ChatCompletionRequest, str | None]:
    """A chat request from a WebSocket message, and the API key it carries.

    Browsers cannot set headers on a WebSocket, so a key may travel as `api_key` in the
    message. The socket always streams, so `stream` defaults to true.
    """
    try:
        raw = json.loads(text)
    except ValueError:
        raise protocol.RequestInvalid("The message is not valid JSON.", None) from None
    if not isinstance(raw, dict):
        raise protocol.RequestInvalid("The message must be a JSON object.", None)
    api_key = raw.pop("api_key", None)
    raw.setdefault("stream", True)
    try:
        body = protocol.ChatCompletionRequest.model_validate(raw)
    except ValidationError as error:
        raise protocol.describe(error) from None
    return body, api_key if isinstance(api_key, str) and api_key else None


class ChatSocket:
    """One WebSocket: chat requests in, the same JSON chunks as SSE out, `[DONE]` after each.

    One generation at a time: the socket closing cancels it (the gRPC call, and so the engine,
    stop within a step); a second request sent while one runs closes the socket with 1008.
    Each request takes a slot of the gateway's `generations`, as an HTTP generation does, and
    is refused with the same 429 error frame when none is free. A client that takes no frame
    for the gateway's stall timeout (the Admission middleware bounds every send) loses its
    socket and its generation.
    """

    def __init__(
        self,
        websocket: WebSocket,
        serving: OpenAIServing,
        limit: int,
        generations: Generations,
    ) -> None:
        self._ws = websocket
        self._serving = serving
        self._limit = limit
        self._generations = generations
        self._handshake_id = websocket.headers.get("x-request-id") or uuid.uuid4().hex
        self._header_key = websocket.headers.get("authorization")
        self._count = 0
        # Whether the running request has sent its [DONE]; it may still be draining its call.
        self._answered = True
        # Whether a send failed: the client left, or took nothing for the stall timeout
        # (Starlette reports both as WebSocketDisconnect). Nothing more can reach it.
        self._lost = False

    async def run(self) -> None:
        # One receive is always pending, so a disconnect is seen while a generation streams.
        incoming = asyncio.ensure_future(self._ws.receive())
        pump: asyncio.Task[None] | None = None
        try:
            while True:
                message = await incoming
                if message["type"] == "websocket.disconnect":
                    return
                incoming = asyncio.ensure_future(self._ws.receive())
                if pump is not None:
                    # Sent after [DONE] while the last call still drained: let it finish first.
                    await pump
                    if self._lost:
                        return
                text = _message_text(message)
                if len(text.encode()) > self._limit:
                    await self._ws.close(_TOO_BIG, f"message exceeds {self._limit} bytes")
                    return
                try:
                    body, ctx = self._request(text)
                except protocol.RequestInvalid as error:
                    await self._error(errors.invalid_request(error.message, error.param))
                    continue
                self._answered = False
                pump = asyncio.ensure_future(self._pump(body, ctx))
                await asyncio.wait({pump, incoming}, return_when=asyncio.FIRST_COMPLETED)
                if self._lost:
                    return  # a send failed (the client left or took nothing): drop the socket
                if pump.done() or self._answered:
                    continue
                # The client spoke while we streamed: it left, or broke the protocol.
                await _stop(pump)
                if incoming.result()["type"] == "websocket.disconnect":
                    return
                await self._ws.close(_POLICY_VIOLATION, "one request at a time per socket")
                return
        except WebSocketDisconnect:
            return
        finally:
            incoming.cancel()
            if pump is not None:
                await _stop(pump)

    def _request(self, text: str) -> tuple[protocol.ChatCompletionRequest, CallContext]:
        body, key = parse_ws_request(text)
        self._count += 1
        request_id = self._handshake_id
        if self._count > 1:
            request_id = f"{request_id}.{self._count}"
        authorization = self._header_key or (f"Bearer {key}" if key else None)
        ctx = CallContext(
            request_id=request_id,
            metadata=call_metadata(request_id, authorization),
            receive=self._ws.receive,
            started=time.perf_counter(),
            route=WS_ROUTE,
        )
        return body, ctx

    async def _error(self, error: errors.HttpError) -> None:
        try:
            await self._ws.send_text(json.dumps(error.body(), separators=(",", ":")))
            await self._ws.send_text(DONE_FRAME)
            self._answered = True
        except WebSocketDisconnect:
            self._lost = True

    async def _pump(self, body: protocol.ChatCompletionRequest, ctx: CallContext) -> None:
        if not self._generations.try_take():
            await self._error(self._generations.refusal)
            return
        token = request_id_var.set(ctx.request_id)
        events = self._serving.chat_events(body, ctx)
        try:
            async for event in events:
                await self._ws.send_text(sse_payload(event))
                self._answered = event == SSE_DONE
        except grpc.RpcError as error:
            # Refused before the first token (unknown model, limits): an error, then [DONE].
            await self._error(errors.from_grpc(error))
        except WebSocketDisconnect:
            self._lost = True  # the generator's finally cancels the generation
        finally:
            self._generations.release()
            await events.aclose()  # type: ignore[attr-defined]
            request_id_var.reset(token)


def _message_text(message: Mapping[str, Any]) -> str:
    text = message.get("text")
    if isinstance(text, str):
        return text
    data = message.get("bytes") or b""
    return bytes(data).decode("utf-8", "replace")


async def _stop(task: asyncio.Task[None]) -> None:
    if task.done():
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def install_ui(
    app: FastAPI,
    serving: Callable[[], OpenAIServing],
    max_body_bytes: int,
    generations: Generations,
) -> None:
    """Add the chat UI at `/`, the admin page at `/admin`, their files under `/ui/`, and the
    chat WebSocket. `serving` returns the running app's OpenAIServing."""
    assets = load_assets(UI_DIR)
    missing = Response(b"not found", status_code=404, media_type="text/plain")

    @app.get("/", include_in_schema=False)
    async def chat_page(request: Request) -> Response:
        return assets["index.html"].response(request)

    @app.get("/admin", include_in_schema=False)
    async def admin_page(request: Request) -> Response:
        # The page holds no data: everything it shows comes from /admin/* with the admin key.
        return assets["admin.html"].response(request)

    @app.get("/ui/{name}", include_in_schema=False)
    async def ui_file(name: str, request: Request) -> Response:
        asset = assets.get(name)
        return missing if asset is None else asset.response(request)

    @app.websocket(WS_ROUTE)
    async def chat_socket(websocket: WebSocket) -> None:
        """Chat over a WebSocket: send a chat request as JSON, receive the SSE chunks' JSON,
        then `[DONE]`; closing the socket cancels the generation."""
        if not same_origin(websocket.headers):
            await websocket.close(_POLICY_VIOLATION, "cross-origin WebSocket refused")
            return
        await websocket.accept()
        await ChatSocket(websocket, serving(), max_body_bytes, generations).run()
