"""SlmError <-> google.rpc.Status with ErrorInfo, BadRequest and RetryInfo."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2

from slm.errors import (
    DOMAIN,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    from_rpc_error,
    to_status_proto,
)


def test_status_carries_error_info_field_and_retry() -> None:
    status = to_status_proto(
        ResourceExhausted("queue full", field="model", retry_after_s=2.5, metadata={"q": "1"})
    )
    assert status.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    assert (info.domain, info.reason, dict(info.metadata)) == (
        DOMAIN,
        "RESOURCE_EXHAUSTED",
        {"q": "1"},
    )
    retry = error_details_pb2.RetryInfo()
    assert status.details[2].Unpack(retry)
    assert retry.retry_delay.ToNanoseconds() == 2_500_000_000


class _Echo:
    """A real grpc.aio server whose handlers raise, to see errors cross the wire."""

    def __init__(self) -> None:
        self.server = grpc.aio.server()

    async def __aenter__(self) -> str:
        from prometheus_client import CollectorRegistry

        from slm.interceptors import ErrorInterceptor, RpcMetrics

        self.server = grpc.aio.server(
            interceptors=[ErrorInterceptor(RpcMetrics(CollectorRegistry()))]
        )

        async def unary(request: bytes, context: Any) -> bytes:
            if request == b"boom":
                raise RuntimeError("secret internal detail")
            raise NotFound("no such model", field="model")

        async def stream(request: bytes, context: Any) -> AsyncIterator[bytes]:
            yield b"first"
            raise InvalidArgument("bad after first", reason="CUSTOM")

        handlers = grpc.method_handlers_generic_handler(
            "test.Echo",
            {
                "Unary": grpc.unary_unary_rpc_method_handler(unary),
                "Stream": grpc.unary_stream_rpc_method_handler(stream),
            },
        )
        self.server.add_generic_rpc_handlers((handlers,))
        port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        return f"127.0.0.1:{port}"

    async def __aexit__(self, *exc: object) -> None:
        await self.server.stop(None)


async def test_errors_cross_the_wire_with_details() -> None:
    async with _Echo() as address, grpc.aio.insecure_channel(address) as channel:
        unary = channel.unary_unary("/test.Echo/Unary")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await unary(b"x")
        error = from_rpc_error(caught.value)
        assert isinstance(error, NotFound)
        assert (error.field, error.reason) == ("model", "NOT_FOUND")

        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await unary(b"boom")
        assert caught.value.code() == grpc.StatusCode.INTERNAL
        assert "secret" not in (caught.value.details() or "")

        stream = channel.unary_stream("/test.Echo/Stream")
        call = stream(b"")
        assert await call.read() == b"first"
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call.read()
        assert from_rpc_error(caught.value).reason == "CUSTOM"
