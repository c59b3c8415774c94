"""Property-based fuzzing of every gRPC method of every service with generated protobuf messages.

A mesh of its own (`slm up`, the kv-cache service included) takes messages that hypothesis
builds from each method's request descriptor: every field, nested messages, oneofs, maps,
repeated fields, out-of-range enum numbers, extreme numbers and odd text. Whatever a message
holds, a service must answer with a deliberate status (INVALID_ARGUMENT, NOT_FOUND, ...) or
succeed: INTERNAL, UNKNOWN or DATA_LOSS, a crashed process, or a Python traceback in the mesh's
log fail the test. The Doorman is reached through Envoy, as clients reach it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from google.protobuf.message import Message
from helpers import Mesh, free_port, mesh_settings
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from slm.config import ServiceEndpoint
from slm.v1 import adapters_pb2, doorman_pb2, inference_pb2, kvcache_pb2, ledger_pb2

# Examples per method; about 30 methods, so a run sends over 5,000 messages.
EXAMPLES = 180
# Statuses that mean the service did not handle its input deliberately.
SERVER_FAULTS = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DATA_LOSS}
# A generation may legitimately run past this; a timeout is a deliberate answer of the client.
CALL_TIMEOUT_S = 3.0
MAX_DEPTH = 4

SERVICES = {
    "doorman": doorman_pb2.DESCRIPTOR.services_by_name["DoormanService"],
    "inference-local": inference_pb2.DESCRIPTOR.services_by_name["InferenceService"],
    "inference-remote": inference_pb2.DESCRIPTOR.services_by_name["InferenceService"],
    "ledger": ledger_pb2.DESCRIPTOR.services_by_name["LedgerService"],
    "adapter-registry": adapters_pb2.DESCRIPTOR.services_by_name["AdapterRegistryService"],
    "kv-cache": kvcache_pb2.DESCRIPTOR.services_by_name["KVCacheService"],
}

INT_RANGES = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}


def integers(low: int, high: int) -> st.SearchStrategy[int]:
    """Small values most of the time (where the interesting checks are), the extremes too."""
    edges = [v for v in (low, high, 0, 1, -1, 2**31 - 1, 2**31, 2**32) if low <= v <= high]
    return st.one_of(
        st.integers(max(low, -4), min(high, 64)), st.sampled_from(edges), st.integers(low, high)
    )


def scalar(field: FieldDescriptor) -> st.SearchStrategy[Any]:
    kind = field.type
    if kind in INT_RANGES:
        return integers(*INT_RANGES[kind])
    if kind == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if kind == FieldDescriptor.TYPE_FLOAT:
        return st.one_of(st.floats(-4, 4), st.floats(width=32))
    if kind == FieldDescriptor.TYPE_DOUBLE:
        return st.one_of(st.floats(-4, 4), st.floats())
    if kind == FieldDescriptor.TYPE_STRING:
        return st.one_of(
            st.text(max_size=24),
            st.sampled_from(["gemma-3-270m", "", "../../etc/passwd", "a" * 300, "{", "*"]),
        )
    if kind == FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=64)
    if kind == FieldDescriptor.TYPE_ENUM:
        assert field.enum_type is not None
        numbers = [v.number for v in field.enum_type.values]
        # proto3 enums are open: numbers no value names arrive too.
        return st.one_of(st.sampled_from(numbers), st.integers(-(2**31), 2**31 - 1))
    raise AssertionError(f"unhandled field type {kind} of {field.full_name}")


def message_class(descriptor: Descriptor) -> type[Message]:
    return message_factory.GetMessageClass(descriptor)


@st.composite
def messages(draw: st.DrawFn, descriptor: Descriptor, depth: int = 0) -> Message:
    """A message of `descriptor` with a random subset of its fields set."""
    message = message_class(descriptor)()
    oneofs_done: set[str] = set()
    for field in descriptor.fields:
        oneof = field.containing_oneof
        if oneof is not None:
            if oneof.name in oneofs_done or not draw(st.booleans()):
                continue
            oneofs_done.add(oneof.name)
        elif not draw(st.booleans()):
            continue
        nested = field.message_type
        if nested is not None and depth >= MAX_DEPTH:
            continue
        if nested is not None and nested.GetOptions().map_entry:
            key_field = nested.fields_by_name["key"]
            value_field = nested.fields_by_name["value"]
            entries = draw(st.lists(st.tuples(scalar(key_field), st.just(None)), max_size=3))
            target = getattr(message, field.name)
            for key, _ in entries:
                if value_field.message_type is not None:
                    target[key].CopyFrom(draw(messages(value_field.message_type, depth + 1)))
                else:
                    target[key] = draw(scalar(value_field))
            continue
        if field.is_repeated:
            count = draw(st.integers(0, 3))
            target = getattr(message, field.name)
            for _ in range(count):
                if nested is not None:
                    target.add().CopyFrom(draw(messages(nested, depth + 1)))
                else:
                    target.append(draw(scalar(field)))
            continue
        if nested is not None:
            getattr(message, field.name).CopyFrom(draw(messages(nested, depth + 1)))
        else:
            setattr(message, field.name, draw(scalar(field)))
    return message


def bounded(message: Message) -> Message:
    """Keep generations short: a fuzz case that asks for 2**31 tokens still gets its
    validation, but a plausible one runs a few tokens, not a whole context."""
    if hasattr(message, "sampling") and message.HasField("sampling"):
        sampling = message.sampling
        if 0 < sampling.max_tokens <= 4096:
            sampling.max_tokens = min(sampling.max_tokens, 4)
        if sampling.n > 4:
            sampling.n = 0  # n's own check is a parse-time refusal: keep the rest reachable
    return message


@pytest.fixture(scope="module")
def fuzz_mesh(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    state = tmp_path_factory.mktemp("fuzz-mesh")
    settings = mesh_settings(state)
    settings.kv_cache.endpoint = ServiceEndpoint(port=free_port(), metrics_port=free_port())
    settings.kv_cache.disk_dir = state / "kv"
    settings.inference_local.kv_cache = settings.kv_cache.endpoint.address
    settings.inference_local.parallel = 4
    settings.adapters.source_dirs = [state / "sources"]
    mesh = Mesh(settings, state / "slm.toml", state / "mesh.log")
    mesh.start()
    yield mesh
    mesh.stop()


def address(mesh: Mesh, service: str) -> str:
    s = mesh.settings
    return {
        "doorman": mesh.grpc_target,
        "inference-local": s.inference_local.endpoint.address,
        "inference-remote": s.inference_remote.endpoint.address,
        "ledger": s.ledger.endpoint.address,
        "adapter-registry": s.adapters.endpoint.address,
        "kv-cache": s.kv_cache.endpoint.address,
    }[service]


CASES = [
    pytest.param(service, method, id=f"{service}.{method.name}")
    for service, descriptor in SERVICES.items()
    for method in descriptor.methods
]


async def call(
    channel: grpc.aio.Channel, sync_channel: grpc.Channel, method: MethodDescriptor, request: Any
) -> None:
    path = f"/{method.containing_service.full_name}/{method.name}"
    codecs = {
        "request_serializer": message_class(method.input_type).SerializeToString,
        "response_deserializer": message_class(method.output_type).FromString,
    }
    if method.client_streaming:
        # On grpcio's sync API: its aio client reports INTERNAL "Internal error from Core"
        # instead of the server's status when the server ends a client-streaming call (a
        # refusal of the first message) while the client is still writing (grpc/grpc#36066).
        if method.server_streaming:
            for _ in sync_channel.stream_stream(path, **codecs)(
                iter(request), timeout=CALL_TIMEOUT_S
            ):
                pass
        else:
            sync_channel.stream_unary(path, **codecs)(iter(request), timeout=CALL_TIMEOUT_S)
    elif method.server_streaming:
        async for _ in channel.unary_stream(path, **codecs)(request, timeout=CALL_TIMEOUT_S):
            pass
    else:
        await channel.unary_unary(path, **codecs)(request, timeout=CALL_TIMEOUT_S)


@pytest.mark.parametrize(("service", "method"), CASES)
def test_every_method_answers_any_message_deliberately(
    fuzz_mesh: Mesh, service: str, method: MethodDescriptor
) -> None:
    faults: list[str] = []
    strategy: st.SearchStrategy[Any] = messages(method.input_type).map(bounded)
    if method.client_streaming:
        strategy = st.lists(strategy, max_size=3)

    async def once(channel: grpc.aio.Channel, request: Any) -> None:
        try:
            await call(channel, sync_channel, method, request)
        except grpc.RpcError as error:
            code, details = error.code(), error.details()
            if code in SERVER_FAULTS:
                faults.append(f"{code.name}: {details} <- {request!r:.300}")

    loop = asyncio.new_event_loop()
    channel = loop.run_until_complete(_open(address(fuzz_mesh, service)))
    sync_channel = grpc.insecure_channel(address(fuzz_mesh, service))

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        database=None,
    )
    @given(request=strategy)
    def fuzz(request: Any) -> None:
        loop.run_until_complete(once(channel, request))

    try:
        fuzz()
    finally:
        sync_channel.close()
        loop.run_until_complete(channel.close())
        loop.close()
    assert faults == []
    assert fuzz_mesh.process is not None
    assert fuzz_mesh.process.poll() is None


async def _open(target: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(target)


def test_no_traceback_and_no_restart_in_the_fuzzed_mesh(fuzz_mesh: Mesh) -> None:
    # Runs after the fuzz cases (pytest keeps file order): the mesh's log holds every service's.
    log = fuzz_mesh.log_path.read_text(errors="replace")
    assert "Traceback" not in log, log[log.find("Traceback") - 2000 :][:6000]
    assert "child exited" not in log
