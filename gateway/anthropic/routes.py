"""HTTP routes of Anthropic's Messages API: POST /v1/messages and /v1/messages/count_tokens."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
from fastapi import APIRouter, Request
from starlette.exceptions import HTTPException
from starlette.responses import Response

from gateway import errors
from gateway.anthropic import protocol
from gateway.anthropic.serving import (
    MessagesRendering,
    chat_request,
    count_tokens_request,
    error_response,
)
from gateway.files import Documents
from gateway.protocol import FileTexts, RequestInvalid
from gateway.serving import CallContext, OpenAIServing, json_response

Body = TypeVar("Body")

MESSAGES = "/v1/messages"
COUNT_TOKENS = "/v1/messages/count_tokens"


def _doc(model: type[Any]) -> dict[str, Any]:
    schema = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": protocol.AnthropicError}
    for status in (400, 401, 403, 404, 413, 429, 500, 503)
}

# The wire models the OpenAPI schema documents.
REQUEST_MODELS = (protocol.MessagesRequest, protocol.CountTokensRequest)


def messages_router(
    serving: Callable[[], OpenAIServing],
    read_body: Callable[[Request], Awaitable[bytes]],
    context: Callable[[Request, str], CallContext],
    documents: Documents,
) -> APIRouter:
    """The Messages routes over the app's OpenAIServing (its Doorman stub and call machinery);
    `documents` reads the document blocks."""
    router = APIRouter()

    async def parsed(
        request: Request, route: str, parse: Callable[[bytes, FileTexts | None], Body]
    ) -> Body | Response:
        """The validated body, or the error response that refuses it (Anthropic's shape)."""
        try:
            return await documents.parse(request, route, await read_body(request), parse)
        except HTTPException as error:
            return error_response(errors.for_status(error.status_code, str(error.detail)))
        except RequestInvalid as error:
            return error_response(errors.invalid_request(error.message, error.param))

    @router.post(
        MESSAGES,
        responses={
            200: {"model": protocol.MessageResponse, "content": {"text/event-stream": {}}},
            **_ERRORS,
        },
        openapi_extra=_doc(protocol.MessagesRequest),
    )
    async def messages(request: Request) -> Response:
        """Anthropic's Messages API: the next assistant turn, streamed as SSE when `stream`."""
        body = await parsed(request, MESSAGES, protocol.parse_messages)
        if isinstance(body, Response):
            return body
        ctx = context(request, MESSAGES)
        rendering = MessagesRendering(ctx.request_id, body.model)
        return await serving().generate(chat_request(body), rendering, bool(body.stream), ctx)

    @router.post(
        COUNT_TOKENS,
        responses={200: {"model": protocol.TokenCount}, **_ERRORS},
        openapi_extra=_doc(protocol.CountTokensRequest),
    )
    async def count_tokens(request: Request) -> Response:
        """The input tokens a Messages request would take, tools included."""
        body = await parsed(request, COUNT_TOKENS, protocol.parse_count_tokens)
        if isinstance(body, Response):
            return body
        ctx = context(request, COUNT_TOKENS)
        try:
            tokens = await serving().count_tokens(count_tokens_request(body), ctx)
        except grpc.RpcError as error:
            return error_response(errors.from_grpc(error))
        return json_response({"input_tokens": tokens})

    return router
