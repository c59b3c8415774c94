"""HTTP route of the Responses API: POST /v1/responses."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, Request
from starlette.exceptions import HTTPException
from starlette.responses import Response

from gateway import errors
from gateway.files import Documents
from gateway.protocol import ErrorResponse, RequestInvalid
from gateway.responses.protocol import ResponsesRequest, parse_responses
from gateway.responses.serving import ResponsesRendering, chat_request
from gateway.serving import CallContext, OpenAIServing

RESPONSES = "/v1/responses"

# The wire models the OpenAPI schema documents.
REQUEST_MODELS = (ResponsesRequest,)

_BODY_DOC = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/ResponsesRequest"}}
        },
    }
}
_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse} for status in (400, 401, 403, 404, 413, 429, 500, 503)
}


def responses_router(
    serving: Callable[[], OpenAIServing],
    read_body: Callable[[Request], Awaitable[bytes]],
    context: Callable[[Request, str], CallContext],
    documents: Documents,
) -> APIRouter:
    """The Responses route over the app's OpenAIServing (its Doorman stub and call machinery);
    `documents` reads the input_file parts."""
    router = APIRouter()

    @router.post(
        RESPONSES,
        responses={
            200: {
                "description": "A Response object, or its events as SSE when `stream`.",
                "content": {"application/json": {}, "text/event-stream": {}},
            },
            **_ERRORS,
        },
        openapi_extra=_BODY_DOC,
    )
    async def create_response(request: Request) -> Response:
        """OpenAI's Responses API, stateless: the whole conversation travels in `input`."""
        try:
            body = await documents.parse(
                request, RESPONSES, await read_body(request), parse_responses
            )
        except HTTPException as error:
            return errors.for_status(error.status_code, str(error.detail)).response()
        except RequestInvalid as error:
            return errors.invalid_request(error.message, error.param).response()
        ctx = context(request, RESPONSES)
        rendering = ResponsesRendering(ctx.request_id, body)
        return await serving().generate(chat_request(body), rendering, bool(body.stream), ctx)

    return router
