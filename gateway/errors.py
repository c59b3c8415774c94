"""The one table from gRPC status codes to HTTP statuses and OpenAI error types."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from pydantic import BaseModel, ValidationError
from starlette.responses import Response

from slm.errors import from_rpc_error

INVALID_REQUEST = "invalid_request_error"
AUTHENTICATION = "authentication_error"
PERMISSION = "permission_error"
NOT_FOUND = "not_found_error"
RATE_LIMIT = "rate_limit_error"
SERVER = "server_error"

# googleapis' mapping (google/rpc/code.proto). Every code not listed is a server fault: 500.
HTTP_BY_GRPC: Mapping[grpc.StatusCode, tuple[int, str]] = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, INVALID_REQUEST),
    grpc.StatusCode.FAILED_PRECONDITION: (400, INVALID_REQUEST),
    grpc.StatusCode.OUT_OF_RANGE: (400, INVALID_REQUEST),
    grpc.StatusCode.UNAUTHENTICATED: (401, AUTHENTICATION),
    grpc.StatusCode.PERMISSION_DENIED: (403, PERMISSION),
    grpc.StatusCode.NOT_FOUND: (404, NOT_FOUND),
    grpc.StatusCode.ABORTED: (409, INVALID_REQUEST),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, RATE_LIMIT),
    # The caller that cancelled is gone; anyone still reading did not cause it, so not a
    # client-error type.
    grpc.StatusCode.CANCELLED: (499, SERVER),
    grpc.StatusCode.UNAVAILABLE: (503, SERVER),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, SERVER),
    # e.g. count_tokens for a model whose tier has no counting endpoint.
    grpc.StatusCode.UNIMPLEMENTED: (501, SERVER),
}
_SERVER_FAULT = (500, SERVER)

# Only these tell the client when to come back; elsewhere a retry hint is noise.
_RETRYABLE_STATUSES = frozenset({429, 503})

# For errors the gateway raises itself, without a gRPC code behind them.
_TYPE_BY_STATUS: Mapping[int, str] = {
    401: AUTHENTICATION,
    403: PERMISSION,
    404: NOT_FOUND,
    429: RATE_LIMIT,
}

# The Doorman names sampling fields by their proto path; clients know them by OpenAI's names.
_PROTO_PREFIXES = ("sampling.",)


def http_for_grpc(code: grpc.StatusCode) -> tuple[int, str]:
    """HTTP status and OpenAI error type for a gRPC status code."""
    return HTTP_BY_GRPC.get(code, _SERVER_FAULT)


def type_for_status(status: int) -> str:
    """OpenAI error type for an HTTP status the gateway produced itself."""
    if status >= 500:
        return SERVER
    return _TYPE_BY_STATUS.get(status, INVALID_REQUEST)


@dataclass(frozen=True, slots=True)
class HttpError:
    """An error as the client will see it: status, OpenAI error object and retry hint."""

    status: int
    message: str
    type: str
    code: str | None = None
    param: str | None = None
    retry_after_s: float | None = None

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def headers(self) -> dict[str, str]:
        if self.retry_after_s is None or self.status not in _RETRYABLE_STATUSES:
            return {}
        # Retry-After takes whole seconds; rounding down would invite a retry that fails.
        return {"retry-after": str(max(0, math.ceil(self.retry_after_s)))}

    def response(self, headers: Mapping[str, str] | None = None) -> Response:
        merged = {**self.headers(), **(headers or {})}
        return Response(
            json.dumps(self.body()).encode(),
            status_code=self.status,
            headers=merged,
            media_type="application/json",
        )

    def sse(self) -> bytes:
        """The error as the last event of a stream that has already started."""
        return b"data: " + json.dumps(self.body()).encode() + b"\n\n"


class Refusal(Exception):
    """Raised where a route or dependency answers with `error`; the app's one handler sends it."""

    def __init__(self, error: HttpError) -> None:
        super().__init__(error.message)
        self.error = error


def _openai_param(field: str | None) -> str | None:
    if not field:
        return None
    for prefix in _PROTO_PREFIXES:
        if field.startswith(prefix):
            return field[len(prefix) :]
    return field


def from_grpc(error: grpc.RpcError) -> HttpError:
    """Translate a failed Doorman call, keeping its reason, field and retry hint."""
    code: grpc.StatusCode = error.code()
    status, kind = http_for_grpc(code)
    detail = from_rpc_error(error)
    message = detail.message
    if code == grpc.StatusCode.UNKNOWN:
        # grpc's default text for UNKNOWN quotes the server's exception; not for clients.
        message = "internal error"
    return HttpError(
        status=status,
        message=message,
        type=kind,
        code=detail.reason.lower() if detail.reason else None,
        param=_openai_param(detail.field),
        retry_after_s=detail.retry_after_s,
    )


def invalid_request(message: str, param: str | None) -> HttpError:
    """A request the gateway refuses before it reaches the Doorman."""
    return HttpError(400, message, INVALID_REQUEST, code="invalid_argument", param=param)


def for_status(status: int, message: str, code: str | None = None) -> HttpError:
    """An error of the gateway's own HTTP layer: unknown route, wrong method, body too large."""
    return HttpError(status, message, type_for_status(status), code=code)


def internal(message: str = "internal error") -> HttpError:
    """A fault of the gateway or the Doorman, never reported as the client's."""
    return HttpError(500, message, SERVER, code="internal")


Body = TypeVar("Body", bound=BaseModel)


def from_validation(error: ValidationError) -> HttpError:
    """A 400 naming the first field a request body got wrong."""
    first = error.errors()[0]
    return invalid_request(str(first["msg"]), ".".join(str(p) for p in first["loc"]) or None)


def validated(model: type[Body], raw: bytes) -> Body:
    """`raw` JSON as `model`; raises Refusal with the 400 for the first wrong field."""
    try:
        return model.model_validate_json(raw)
    except ValidationError as error:
        raise Refusal(from_validation(error)) from None
