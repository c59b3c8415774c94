"""The gateway's pure parts: OpenAI request validation, translation to protobuf, the error table."""

from __future__ import annotations

import json
import math
from typing import Any

import grpc
import pytest
from grpc_status import rpc_status

from gateway import errors
from gateway.protocol import RequestInvalid, parse_chat, parse_completion
from gateway.serving import (
    ChatFormat,
    CompletionFormat,
    Generation,
    GenerationBuilder,
    call_metadata,
    chat_request,
    completion_request,
    finish_reason,
    sse,
)
from slm.errors import (
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    SlmError,
    Unavailable,
    to_status_proto,
)
from slm.v1 import types_pb2


def chat_body(**fields: Any) -> bytes:
    body: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    body.update(fields)
    return json.dumps(body).encode()


def invalid_param(parse: Any, body: bytes) -> str | None:
    with pytest.raises(RequestInvalid) as caught:
        parse(body)
    return caught.value.param


# --- validation ---------------------------------------------------------------------------------


def test_chat_request_is_translated_field_by_field() -> None:
    body = parse_chat(
        chat_body(
            messages=[
                {"role": "system", "content": "be brief"},
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
                },
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "call_1",
                            "type": "function",
                            "function": {"name": "calc", "arguments": '{"x":1}'},
                        }
                    ],
                },
                {"role": "tool", "content": "42", "name": "calc", "tool_call_id": "call_1"},
            ],
            max_tokens=7,
            temperature=0.0,
            top_p=0.5,
            stop=["\n", ""],
            seed=3,
            logit_bias={"1": 2},
        )
    )
    request = chat_request(body)
    assert request.model == "m"
    assert [(m.role, m.content, m.name, m.tool_call_id) for m in request.messages] == [
        (types_pb2.ROLE_SYSTEM, "be brief", "", ""),
        (types_pb2.ROLE_USER, "a\nb", "", ""),
        (types_pb2.ROLE_ASSISTANT, "", "", ""),
        (types_pb2.ROLE_TOOL, "42", "calc", "call_1"),
    ]
    (call,) = request.messages[2].tool_calls
    assert (call.id, call.name, call.arguments) == ("call_1", "calc", '{"x":1}')
    assert not request.HasField("tools")
    assert dict(request.sampling.logit_bias) == {1: 2.0}
    sampling = request.sampling
    assert sampling.max_tokens == 7
    # temperature 0 (greedy) must be sent, not mistaken for "unset".
    assert sampling.HasField("temperature")
    assert sampling.temperature == 0.0
    assert sampling.top_p == 0.5
    assert list(sampling.stop) == ["\n"]
    assert sampling.seed == 3


def test_unset_sampling_fields_stay_unset_for_engine_defaults() -> None:
    sampling = chat_request(parse_chat(chat_body())).sampling
    for name in ("max_tokens", "temperature", "top_p", "seed"):
        assert not sampling.HasField(name), name
    assert list(sampling.stop) == []


def test_max_completion_tokens_wins_over_max_tokens() -> None:
    request = chat_request(parse_chat(chat_body(max_tokens=5, max_completion_tokens=9)))
    assert request.sampling.max_tokens == 9


def test_stop_string_becomes_a_list() -> None:
    assert list(chat_request(parse_chat(chat_body(stop="END"))).sampling.stop) == ["END"]


@pytest.mark.parametrize("prompt", ["once upon", ["once upon"]])
def test_completion_prompt_string_or_single_item_list(prompt: Any) -> None:
    body = parse_completion(json.dumps({"model": "m", "prompt": prompt, "seed": 1}).encode())
    request = completion_request(body)
    assert request.prompt == "once upon"
    assert request.sampling.seed == 1


def test_stream_flags() -> None:
    body = parse_chat(chat_body(stream=True, stream_options={"include_usage": True}))
    assert body.streaming
    assert body.include_usage
    plain = parse_chat(chat_body(stream=True))
    assert plain.streaming
    assert not plain.include_usage
    assert not parse_chat(chat_body(stream=None)).streaming


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"model": None}, "model"),
        ({"model": ""}, "model"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"content": "x"}]}, "messages[0].role"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
            "messages[0].content",
        ),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ({"temperature": 2.5}, "temperature"),
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_completion_tokens": -1}, "max_completion_tokens"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"stop": [1]}, "stop[0]"),
        ({"seed": -1}, "seed"),
        ({"n": 9}, "n"),
        ({"n": 0}, "n"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"stream": "sometimes"}, "stream"),
    ],
)
def test_invalid_chat_fields_name_their_param(fields: dict[str, Any], param: str) -> None:
    body: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    body.update(fields)
    if fields.get("model", "") is None:
        del body["model"]
    assert invalid_param(parse_chat, json.dumps(body).encode()) == param


def test_missing_field_message_names_it() -> None:
    with pytest.raises(RequestInvalid) as caught:
        parse_chat(b'{"messages": [{"role": "user", "content": "hi"}]}')
    assert caught.value.message == "Missing required parameter: 'model'."


@pytest.mark.parametrize(
    "prompt",
    [["a", "b"], [], [1, 2, 3], [[1, 2]], None],
    ids=["two", "empty", "tokens", "nested", "null"],
)
def test_completion_prompt_must_be_one_string(prompt: Any) -> None:
    body = json.dumps({"model": "m", "prompt": prompt}).encode()
    assert invalid_param(parse_completion, body) == "prompt"


@pytest.mark.parametrize("raw", [b"", b"{", b"[]", b'"text"', b"null"])
def test_body_that_is_not_a_json_object_has_no_param(raw: bytes) -> None:
    assert invalid_param(parse_chat, raw) is None


# --- responses ----------------------------------------------------------------------------------


def parse_sse(frame: bytes) -> dict[str, Any]:
    assert frame.startswith(b"data: ")
    assert frame.endswith(b"\n\n")
    result: dict[str, Any] = json.loads(frame[len(b"data: ") : -2])
    return result


@pytest.mark.parametrize("text", ["plain", 'quote " and \\ slash', "new\nline", "ünïcødé ✓", ""])
@pytest.mark.parametrize("include_usage", [True, False])
def test_chat_delta_chunk_is_valid_json(text: str, include_usage: bool) -> None:
    fmt = ChatFormat("abc", 'model "x"', include_usage)
    chunk = parse_sse(fmt.text_delta(text))
    assert chunk["id"] == "chatcmpl-abc"
    assert chunk["object"] == "chat.completion.chunk"
    assert chunk["model"] == 'model "x"'
    assert chunk["choices"] == [
        {"index": 0, "delta": {"content": text}, "logprobs": None, "finish_reason": None}
    ]
    if include_usage:
        assert chunk["usage"] is None
    else:
        assert "usage" not in chunk


def test_chat_stream_frames() -> None:
    fmt = ChatFormat("r1", "m", include_usage=True)
    (frame,) = fmt.opening()
    opening = parse_sse(frame)
    assert opening["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert opening["usage"] is None
    finish = parse_sse(fmt.finish("length"))
    assert finish["choices"][0]["delta"] == {}
    assert finish["choices"][0]["finish_reason"] == "length"
    usage = types_pb2.Usage(prompt_tokens=3, completion_tokens=4, total_tokens=7)
    last = parse_sse(fmt.usage(usage))
    assert last["choices"] == []
    assert last["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}


def test_completion_stream_frames() -> None:
    fmt = CompletionFormat("r2", "m", include_usage=False)
    assert fmt.opening() == []
    chunk = parse_sse(fmt.text_delta("tail"))
    assert chunk["id"] == "cmpl-r2"
    assert chunk["object"] == "text_completion"
    assert chunk["choices"][0]["text"] == "tail"
    assert "usage" not in chunk
    assert parse_sse(fmt.finish("stop"))["choices"][0] == {
        "index": 0,
        "text": "",
        "logprobs": None,
        "finish_reason": "stop",
        "stop_reason": None,
    }


def test_the_stop_string_that_ended_a_choice_is_vllms_stop_reason() -> None:
    """vLLM's clients read choices[].stop_reason; a second mesh's inference-remote does too."""
    one = types_pb2.StreamEnd(finish_reason=types_pb2.FINISH_REASON_STOP, stop_sequence="##")
    chat = ChatFormat("r", "m", include_usage=False)
    assert chat.whole(whole("a", one))["choices"][0]["stop_reason"] == "##"
    (finish, _) = chat.closing(one)
    assert parse_sse(finish)["choices"][0]["stop_reason"] == "##"
    two = types_pb2.StreamEnd(
        finish_reason=types_pb2.FINISH_REASON_STOP,
        choices=[
            types_pb2.ChoiceEnd(index=0, finish_reason=types_pb2.FINISH_REASON_STOP),
            types_pb2.ChoiceEnd(
                index=1, finish_reason=types_pb2.FINISH_REASON_STOP, stop_sequence="##"
            ),
        ],
    )
    frames = CompletionFormat("r", "m", include_usage=False, n=2).closing(two)
    reasons = [parse_sse(f)["choices"][0]["stop_reason"] for f in frames[:-1]]
    assert reasons == [None, "##"]


def whole(text: str, end: types_pb2.StreamEnd) -> Generation:
    builder = GenerationBuilder()
    builder.add(types_pb2.TextDelta(text=text))
    return builder.build(end)


def test_whole_responses() -> None:
    end = types_pb2.StreamEnd(
        finish_reason=types_pb2.FINISH_REASON_CONTENT_FILTER,
        usage=types_pb2.Usage(prompt_tokens=2, completion_tokens=1),
        model="served",
    )
    chat = ChatFormat("r", "asked", include_usage=False).whole(whole("hello", end))
    assert chat["object"] == "chat.completion"
    assert chat["model"] == "served"
    assert chat["choices"][0]["message"] == {"role": "assistant", "content": "hello"}
    assert chat["choices"][0]["finish_reason"] == "content_filter"
    # total_tokens is derived when the Doorman left it out.
    assert chat["usage"] == {"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3}
    text = CompletionFormat("r", "asked", include_usage=False).whole(whole("x", end))
    assert text["object"] == "text_completion"
    assert text["choices"][0]["text"] == "x"


@pytest.mark.parametrize(
    ("reason", "expected"),
    [
        (types_pb2.FINISH_REASON_STOP, "stop"),
        (types_pb2.FINISH_REASON_LENGTH, "length"),
        (types_pb2.FINISH_REASON_CONTENT_FILTER, "content_filter"),
        (types_pb2.FINISH_REASON_UNSPECIFIED, "stop"),
    ],
)
def test_finish_reasons(reason: types_pb2.FinishReason.ValueType, expected: str) -> None:
    assert finish_reason(reason) == expected


def test_sse_frame() -> None:
    assert sse({"a": 1}) == b'data: {"a":1}\n\n'


def test_metadata_passes_the_key_only_when_sent() -> None:
    assert call_metadata("id1", None) == (("x-request-id", "id1"),)
    assert call_metadata("id1", "Bearer k") == (
        ("x-request-id", "id1"),
        ("authorization", "Bearer k"),
    )


# --- the error table ----------------------------------------------------------------------------


def rpc_error(
    code: grpc.StatusCode, error: SlmError | None = None, details: str = "boom"
) -> grpc.aio.AioRpcError:
    """A real AioRpcError as a failed call raises it, with rich details when `error` is given."""
    trailers = grpc.aio.Metadata()
    if error is not None:
        status = rpc_status.to_status(to_status_proto(error))
        trailers = grpc.aio.Metadata(*status.trailing_metadata)
        details = error.message
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), trailers, details, None)


@pytest.mark.parametrize(
    ("code", "status", "kind"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, 400, "invalid_request_error"),
        (grpc.StatusCode.FAILED_PRECONDITION, 400, "invalid_request_error"),
        (grpc.StatusCode.OUT_OF_RANGE, 400, "invalid_request_error"),
        (grpc.StatusCode.UNAUTHENTICATED, 401, "authentication_error"),
        (grpc.StatusCode.PERMISSION_DENIED, 403, "permission_error"),
        (grpc.StatusCode.NOT_FOUND, 404, "not_found_error"),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, 429, "rate_limit_error"),
        (grpc.StatusCode.CANCELLED, 499, "server_error"),
        (grpc.StatusCode.UNAVAILABLE, 503, "server_error"),
        (grpc.StatusCode.DEADLINE_EXCEEDED, 504, "server_error"),
        (grpc.StatusCode.INTERNAL, 500, "server_error"),
        (grpc.StatusCode.UNKNOWN, 500, "server_error"),
        (grpc.StatusCode.UNIMPLEMENTED, 501, "server_error"),
        (grpc.StatusCode.DATA_LOSS, 500, "server_error"),
        # Another operation on the same state is under way: Conflict, as googleapis maps it.
        (grpc.StatusCode.ABORTED, 409, "invalid_request_error"),
    ],
)
def test_grpc_code_table(code: grpc.StatusCode, status: int, kind: str) -> None:
    error = errors.from_grpc(rpc_error(code))
    assert (error.status, error.type) == (status, kind)


def test_server_faults_never_use_a_client_error_type() -> None:
    for code in grpc.StatusCode:
        status, kind = errors.http_for_grpc(code)
        if status >= 500:
            assert kind == errors.SERVER, code


def test_rich_details_survive() -> None:
    source = InvalidArgument(
        "temperature must be at most 2", reason="BAD_SAMPLING", field="sampling.temperature"
    )
    error = errors.from_grpc(rpc_error(grpc.StatusCode.INVALID_ARGUMENT, source))
    response = error.response()
    assert response.status_code == 400
    assert json.loads(bytes(response.body)) == {
        "error": {
            "message": "temperature must be at most 2",
            "type": "invalid_request_error",
            "param": "temperature",
            "code": "bad_sampling",
        }
    }
    assert "retry-after" not in response.headers


def test_not_found_reason_is_the_code() -> None:
    error = errors.from_grpc(rpc_error(grpc.StatusCode.NOT_FOUND, NotFound("no model x")))
    assert error.code == "not_found"
    assert error.message == "no model x"


@pytest.mark.parametrize("delay", [0.2, 1.0, 2.01, 30.0])
@pytest.mark.parametrize(
    ("code", "cls"),
    [
        (grpc.StatusCode.RESOURCE_EXHAUSTED, ResourceExhausted),
        (grpc.StatusCode.UNAVAILABLE, Unavailable),
    ],
)
def test_retry_after_is_whole_seconds_rounded_up(
    code: grpc.StatusCode, cls: type[SlmError], delay: float
) -> None:
    error = errors.from_grpc(rpc_error(code, cls("busy", retry_after_s=delay)))
    response = error.response({"x-request-id": "r"})
    assert response.headers["retry-after"] == str(math.ceil(delay))
    assert response.headers["x-request-id"] == "r"


def test_no_retry_after_without_a_hint() -> None:
    error = errors.from_grpc(rpc_error(grpc.StatusCode.UNAVAILABLE))
    assert error.status == 503
    assert error.headers() == {}


def test_unknown_errors_do_not_leak_server_text() -> None:
    error = errors.from_grpc(
        rpc_error(grpc.StatusCode.UNKNOWN, details="Exception calling application: KeyError('x')")
    )
    assert error.status == 500
    assert "KeyError" not in error.message


def test_error_inside_a_stream_is_one_sse_event() -> None:
    error = errors.from_grpc(rpc_error(grpc.StatusCode.UNAVAILABLE, Unavailable("tier down")))
    event = parse_sse(error.sse())
    assert event["error"]["type"] == "server_error"
    assert event["error"]["message"] == "tier down"


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (400, "invalid_request_error"),
        (404, "not_found_error"),
        (405, "invalid_request_error"),
        (413, "invalid_request_error"),
        (500, "server_error"),
        (502, "server_error"),
    ],
)
def test_gateway_own_statuses(status: int, kind: str) -> None:
    assert errors.for_status(status, "m").type == kind
