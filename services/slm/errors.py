"""The one exception hierarchy of the mesh, and its mapping to gRPC status with rich details."""

from __future__ import annotations

from collections.abc import Mapping

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

DOMAIN = "slm.v1"


class SlmError(Exception):
    """Base of every error the mesh reports on purpose."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    reason: str = "INTERNAL"

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
        field: str | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if reason is not None:
            self.reason = reason
        self.metadata = dict(metadata or {})
        self.field = field
        self.retry_after_s = retry_after_s


class InvalidArgument(SlmError):
    """The request is malformed or out of range; retrying it unchanged will fail again."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = "INVALID_ARGUMENT"


class NotFound(SlmError):
    """The named model or resource does not exist."""

    code = grpc.StatusCode.NOT_FOUND
    reason = "NOT_FOUND"


class Unauthenticated(SlmError):
    """No valid credentials were presented."""

    code = grpc.StatusCode.UNAUTHENTICATED
    reason = "UNAUTHENTICATED"


class PermissionDenied(SlmError):
    """The caller is known but may not do this."""

    code = grpc.StatusCode.PERMISSION_DENIED
    reason = "PERMISSION_DENIED"


class ResourceExhausted(SlmError):
    """A limit or queue is full; retry after the hinted delay."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "RESOURCE_EXHAUSTED"


class FailedPrecondition(SlmError):
    """The system is not in a state that allows the operation."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "FAILED_PRECONDITION"


class Aborted(SlmError):
    """Another operation on the same state is in progress; retry once it has finished."""

    code = grpc.StatusCode.ABORTED
    reason = "ABORTED"


class Unavailable(SlmError):
    """A dependency is down or not ready; the call may succeed later."""

    code = grpc.StatusCode.UNAVAILABLE
    reason = "UNAVAILABLE"


class DeadlineExceeded(SlmError):
    """The caller's deadline passed before the work finished."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED
    reason = "DEADLINE_EXCEEDED"


class Unimplemented(SlmError):
    """The operation is not implemented by this server or tier."""

    code = grpc.StatusCode.UNIMPLEMENTED
    reason = "UNIMPLEMENTED"


class Internal(SlmError):
    """A fault of the server, never of the client."""

    code = grpc.StatusCode.INTERNAL
    reason = "INTERNAL"


def _pack(message: Message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def to_status_proto(error: SlmError) -> status_pb2.Status:
    """The google.rpc.Status: ErrorInfo, plus BadRequest and RetryInfo where they apply."""
    details = [
        _pack(
            error_details_pb2.ErrorInfo(reason=error.reason, domain=DOMAIN, metadata=error.metadata)
        )
    ]
    if error.field is not None:
        violation = error_details_pb2.BadRequest.FieldViolation(
            field=error.field, description=error.message
        )
        details.append(_pack(error_details_pb2.BadRequest(field_violations=[violation])))
    if error.retry_after_s is not None:
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int(error.retry_after_s * 1e9))
        details.append(_pack(error_details_pb2.RetryInfo(retry_delay=delay)))
    return status_pb2.Status(code=error.code.value[0], message=error.message, details=details)


def to_grpc_status(error: SlmError) -> grpc.Status:
    """The grpc.Status whose trailing metadata carries the rich details."""
    return rpc_status.to_status(to_status_proto(error))


_BY_CODE: dict[grpc.StatusCode, type[SlmError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        Unauthenticated,
        PermissionDenied,
        ResourceExhausted,
        FailedPrecondition,
        Aborted,
        Unavailable,
        DeadlineExceeded,
        Unimplemented,
        Internal,
    )
}


def from_rpc_error(error: grpc.RpcError) -> SlmError:
    """Rebuild an SlmError from a failed call, keeping the reason, field and retry hint.

    Lets a hop (the Doorman, the gateway) pass an upstream error on without losing its details.
    """
    code: grpc.StatusCode = error.code()
    message: str = error.details() or code.name
    cls = _BY_CODE.get(code, Internal if code != grpc.StatusCode.CANCELLED else Unavailable)
    result = cls(message)
    if code == grpc.StatusCode.CANCELLED:
        result.reason = "CANCELLED"
    status = _status_from_trailers(error)
    if status is not None:
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                result.reason = info.reason
                result.metadata = dict(info.metadata)
            elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                if bad.field_violations:
                    result.field = bad.field_violations[0].field
            elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                retry = error_details_pb2.RetryInfo()
                detail.Unpack(retry)
                result.retry_after_s = retry.retry_delay.ToNanoseconds() / 1e9
    return result


def _status_from_trailers(error: grpc.RpcError) -> status_pb2.Status | None:
    trailers = error.trailing_metadata()
    for key, value in trailers or ():
        if key == "grpc-status-details-bin" and isinstance(value, bytes):
            status = status_pb2.Status()
            status.ParseFromString(value)
            return status
    return None


__all__ = [
    "DOMAIN",
    "Aborted",
    "DeadlineExceeded",
    "FailedPrecondition",
    "Internal",
    "InvalidArgument",
    "NotFound",
    "PermissionDenied",
    "ResourceExhausted",
    "SlmError",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "from_rpc_error",
    "to_grpc_status",
    "to_status_proto",
]
