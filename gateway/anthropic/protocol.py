"""Anthropic Messages wire models the gateway accepts, validated once at the HTTP edge."""

from __future__ import annotations

import base64
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    model_validator,
)
from pydantic_core import PydanticCustomError

from gateway.documents import DocumentError
from gateway.protocol import (
    A_STRING,
    TOOL_NAME_PATTERN,
    AlsoAccepts,
    AlsoAcceptsItems,
    FileTexts,
    RequestInvalid,
    error_param,
)

_UINT32_MAX = (1 << 32) - 1


class _Wire(BaseModel):
    # Unknown fields and block types are refused by name, never dropped (see gateway.protocol).
    # Strict: JSON's types as the document states them (`false` is no 0).
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class CacheControl(_Wire):
    # Anthropic's prompt-caching hint. The engine reuses every cached prefix on its own, so the
    # hint changes nothing in the answer; it is accepted so that clients which always send it
    # (Claude Code, LangChain's caching helpers) keep working.
    type: Literal["ephemeral"]
    ttl: Literal["5m", "1h"] | None = None


class TextBlock(_Wire):
    type: Literal["text"]
    text: str
    cache_control: CacheControl | None = None


def _text_blocks(value: Any) -> Any:
    """A string is one text block; keeps errors at `content`, not at a union arm."""
    if isinstance(value, str):
        return [{"type": "text", "text": value}]
    return value


TextContent = Annotated[list[TextBlock], BeforeValidator(_text_blocks), AlsoAccepts(A_STRING)]

# Which fields each block type takes beyond `type`; others are refused by name.
_BLOCK_FIELDS: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    # type: (required, allowed)
    "text": (frozenset({"text"}), frozenset({"text", "cache_control"})),
    "tool_use": (
        frozenset({"id", "name", "input"}),
        frozenset({"id", "name", "input", "cache_control"}),
    ),
    "tool_result": (
        frozenset({"tool_use_id"}),
        frozenset({"tool_use_id", "content", "is_error", "cache_control"}),
    ),
    # Anthropic drops the thinking of earlier turns from the prompt itself, so clients send them
    # back; they are accepted in assistant turns and not shown to the model, as Anthropic does.
    "thinking": (frozenset({"thinking"}), frozenset({"thinking", "signature"})),
    "redacted_thinking": (frozenset({"data"}), frozenset({"data"})),
}


class ContentBlock(_Wire):
    """One block of a message: text, tool_use, tool_result, or an earlier turn's thinking.

    One model for all types, so that an error names `messages[i].content[j].field` rather than
    a union arm; which fields a type takes is checked below.
    """

    type: Literal["text", "tool_use", "tool_result", "thinking", "redacted_thinking"]
    text: str | None = None
    id: str | None = Field(default=None, min_length=1)
    name: str | None = Field(default=None, pattern=TOOL_NAME_PATTERN)
    input: dict[str, Any] | None = None
    tool_use_id: str | None = Field(default=None, min_length=1)
    content: TextContent | None = None
    is_error: bool | None = None
    thinking: str | None = None
    signature: str | None = None
    data: str | None = None
    cache_control: CacheControl | None = None

    @model_validator(mode="after")
    def _fields_of_its_type(self) -> ContentBlock:
        required, allowed = _BLOCK_FIELDS[self.type]
        given = {name for name in self.model_fields_set if name != "type"}
        for name in sorted(required - given):
            raise PydanticCustomError(
                "block_field",
                "a {kind} block needs {field}",
                {"kind": self.type, "field": name},
            )
        for name in sorted(given - allowed):
            raise PydanticCustomError(
                "block_field",
                "a {kind} block does not take {field}",
                {"kind": self.type, "field": name},
            )
        return self

    @property
    def result_text(self) -> str:
        return "\n".join(b.text for b in self.content or [])


def _documents_as_text(value: Any, info: ValidationInfo) -> Any:
    """A document block becomes a text block holding its file's text here, so that it is
    sanitised like any text from here on (see gateway.protocol's file parts)."""
    value = _text_blocks(value)
    if not isinstance(value, list):
        return value
    return [
        _document_text(block, index, info)
        if isinstance(block, dict) and block.get("type") == "document"
        else block
        for index, block in enumerate(value)
    ]


_DOCUMENT_FIELDS = frozenset({"type", "source", "title", "context", "cache_control", "citations"})


def _document_text(block: dict[str, Any], index: int, info: ValidationInfo) -> dict[str, Any]:
    def refuse(field: str, message: str) -> PydanticCustomError:
        # The reason travels in the context: a template would read braces in it as fields.
        return PydanticCustomError(
            "document", "{reason}", {"reason": message, "field": f"{index}.{field}"}
        )

    for name in sorted(set(block) - _DOCUMENT_FIELDS):
        raise refuse(name, "Extra inputs are not permitted")
    citations = block.get("citations")
    # Compared by identity: {"enabled": 0} == {"enabled": False} in Python, not in JSON.
    if citations is not None and not (
        isinstance(citations, dict)
        and set(citations) == {"enabled"}
        and citations["enabled"] is False
    ):
        raise refuse("citations", "citations are not supported; send enabled false or leave it out")
    title, context = block.get("title"), block.get("context")
    for name, text in (("title", title), ("context", context)):
        if text is not None and not isinstance(text, str):
            raise refuse(name, "Input should be a valid string")
    source = block.get("source")
    files: FileTexts | None = (info.context or {}).get("files")
    if files is None:
        raise refuse("type", "document blocks are not accepted here")
    if not isinstance(source, dict):
        raise refuse("source", "a document needs a source object")
    kind, media_type, data = source.get("type"), source.get("media_type"), source.get("data")
    for name, value in source.items():
        if not isinstance(value, str):
            raise refuse(f"source.{name}", "Input should be a valid string")
    file: dict[str, Any]
    if kind == "base64" and set(source) == {"type", "media_type", "data"}:
        file = {"file_data": f"data:{media_type};base64,{data}"}
    elif kind == "text" and set(source) == {"type", "media_type", "data"}:
        if media_type != "text/plain":
            raise refuse("source.media_type", "a text source's media_type is 'text/plain'")
        file = {"file_data": f"data:text/plain;base64,{_b64(data)}"}
    elif kind == "file" and set(source) == {"type", "file_id"}:
        file = {"file_id": source["file_id"]}
    else:
        raise refuse(
            "source",
            "a document source is {type: base64, media_type, data}, {type: text, media_type, "
            "data} or {type: file, file_id}; url and content sources are not supported",
        )
    if title is not None:
        file["filename"] = title
    try:
        text = files.text_of(file)
    except DocumentError as error:
        raise refuse("source", error.message) from None
    text = f"{context}\n{text}" if context else text
    converted: dict[str, Any] = {"type": "text", "text": text}
    if "cache_control" in block:
        converted["cache_control"] = block["cache_control"]
    return converted


def _b64(data: object) -> str:
    if not isinstance(data, str):
        raise PydanticCustomError("document", "a text source's data must be a string")
    return base64.b64encode(data.encode()).decode()


_NULL = {"type": "null"}
_DOCUMENT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "type": {"const": "document"},
        "source": {
            "anyOf": [
                {
                    "type": "object",
                    "properties": {
                        "type": {"const": "base64"},
                        "media_type": {"type": "string"},
                        "data": {"type": "string"},
                    },
                    "required": ["type", "media_type", "data"],
                    "additionalProperties": False,
                },
                {
                    "type": "object",
                    "properties": {
                        "type": {"const": "text"},
                        "media_type": {"const": "text/plain"},
                        "data": {"type": "string"},
                    },
                    "required": ["type", "media_type", "data"],
                    "additionalProperties": False,
                },
                {
                    "type": "object",
                    "properties": {"type": {"const": "file"}, "file_id": {"type": "string"}},
                    "required": ["type", "file_id"],
                    "additionalProperties": False,
                },
            ]
        },
        "title": {"anyOf": [{"type": "string"}, _NULL]},
        "context": {"anyOf": [{"type": "string"}, _NULL]},
        "cache_control": {
            "anyOf": [
                {
                    "type": "object",
                    "properties": {
                        "type": {"const": "ephemeral"},
                        "ttl": {"anyOf": [{"enum": ["5m", "1h"]}, _NULL]},
                    },
                    "required": ["type"],
                    "additionalProperties": False,
                },
                _NULL,
            ]
        },
        "citations": {
            "anyOf": [
                {
                    "type": "object",
                    "properties": {"enabled": {"const": False}},
                    "required": ["enabled"],
                    "additionalProperties": False,
                },
                _NULL,
            ]
        },
    },
    "required": ["type", "source"],
    "additionalProperties": False,
}


# Blocks only their own role may carry.
_ROLE_BLOCKS = {
    "user": frozenset({"text", "tool_result"}),
    "assistant": frozenset({"text", "tool_use", "thinking", "redacted_thinking"}),
}


class MessageParam(_Wire):
    role: Literal["user", "assistant"]
    content: Annotated[
        list[ContentBlock],
        BeforeValidator(_documents_as_text),
        AlsoAcceptsItems(_DOCUMENT_SCHEMA),
        AlsoAccepts(A_STRING),
    ]

    @model_validator(mode="after")
    def _blocks_fit_the_role(self) -> MessageParam:
        for index, block in enumerate(self.content):
            if block.type not in _ROLE_BLOCKS[self.role]:
                raise PydanticCustomError(
                    "block_role",
                    "{kind} blocks are not allowed in {role} messages",
                    {"kind": block.type, "role": self.role, "field": f"content.{index}.type"},
                )
        return self


class ToolParam(_Wire):
    # A client tool; Anthropic's server tools (web_search_..., bash_..., text_editor_...) carry
    # another type and are refused, naming it.
    type: Literal["custom"] | None = None
    name: str = Field(pattern=TOOL_NAME_PATTERN)
    description: str | None = None
    input_schema: dict[str, Any]
    strict: bool | None = None
    cache_control: CacheControl | None = None


class ToolChoiceParam(_Wire):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = None

    @model_validator(mode="after")
    def _named_for_tool(self) -> ToolChoiceParam:
        if (self.type == "tool") != (self.name is not None):
            raise PydanticCustomError(
                "tool_choice", "a name is given exactly when tool_choice.type is 'tool'"
            )
        if self.type == "none" and self.disable_parallel_tool_use is not None:
            raise PydanticCustomError(
                "tool_choice",
                "tool_choice 'none' does not take disable_parallel_tool_use",
                {"field": "disable_parallel_tool_use"},
            )
        return self


class Metadata(_Wire):
    # An opaque end-user id for Anthropic's abuse tracking; it changes nothing in the answer.
    user_id: str | None = None


class JsonOutputFormat(_Wire):
    type: Literal["json_schema"]
    # `schema` would shadow a BaseModel attribute; the wire name stays Anthropic's.
    schema_: dict[str, Any] = Field(alias="schema")


class OutputConfig(_Wire):
    format: JsonOutputFormat | None = None


class _Conversation(_Wire):
    model: str = Field(min_length=1)
    messages: list[MessageParam] = Field(min_length=1)
    system: TextContent | None = None
    tools: list[ToolParam] | None = None
    tool_choice: ToolChoiceParam | None = None

    @model_validator(mode="after")
    def _choice_among_tools(self) -> _Conversation:
        names = [t.name for t in self.tools or []]
        if len(names) != len(set(names)):
            raise PydanticCustomError("tools", "tool names must be unique", {"field": "tools"})
        choice = self.tool_choice
        if choice is not None and choice.name is not None and choice.name not in names:
            raise PydanticCustomError(
                "tool_choice",
                "tool_choice names a tool that is not among tools",
                {"field": "tool_choice.name"},
            )
        if choice is not None and choice.type in ("any", "tool") and not names:
            raise PydanticCustomError(
                "tool_choice",
                "tool_choice '{kind}' needs tools",
                {"kind": choice.type, "field": "tool_choice"},
            )
        return self


class MessagesRequest(_Conversation):
    """Body of POST /v1/messages."""

    # Examples a reader (and a fuzzer's examples phase) can send as they are: short answers.
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "model": "gemma-3-270m",
                    "max_tokens": 8,
                    "messages": [{"role": "user", "content": "Name three colours."}],
                }
            ]
        }
    )

    max_tokens: int = Field(ge=1, le=_UINT32_MAX)
    stop_sequences: list[str] | None = None
    stream: bool | None = None
    temperature: float | None = Field(default=None, ge=0.0, le=1.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0, le=_UINT32_MAX)
    metadata: Metadata | None = None
    output_config: OutputConfig | None = None


class CountTokensRequest(_Conversation):
    """Body of POST /v1/messages/count_tokens."""

    # Examples a reader (and a fuzzer's examples phase) can send as they are: short answers.
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "model": "gemma-3-270m",
                    "messages": [{"role": "user", "content": "Name three colours."}],
                }
            ]
        }
    )

    output_config: OutputConfig | None = None


def describe(error: ValidationError) -> RequestInvalid:
    """The first problem, in the words Anthropic's API uses ("field: message")."""
    first = error.errors(include_url=False, include_input=False)[0]
    loc = tuple(first["loc"])
    field = (first.get("ctx") or {}).get("field")
    if isinstance(field, str):
        loc = (*loc, *(int(p) if p.isdigit() else p for p in field.split(".")))
    # Anthropic names fields with dots, indices included: messages.0.content.1.type.
    param = ".".join(str(p) for p in loc) or None
    kind = first["type"]
    if kind == "json_invalid":
        return RequestInvalid("The request body is not valid JSON.", None)
    if kind == "extra_forbidden":
        message = "Extra inputs are not permitted"
    elif kind == "missing":
        message = "Field required"
    else:
        message = str(first["msg"])
    text = f"{param}: {message}" if param else message
    return RequestInvalid(text, error_param(loc) or None)


def parse_messages(body: bytes, files: FileTexts | None = None) -> MessagesRequest:
    """Validate a Messages body straight from JSON bytes, document blocks read by `files`
    (without it, they are refused); raises RequestInvalid. Reading files blocks: use a thread."""
    try:
        return MessagesRequest.model_validate_json(body, context={"files": files})
    except ValidationError as error:
        raise describe(error) from None


def parse_count_tokens(body: bytes, files: FileTexts | None = None) -> CountTokensRequest:
    """Validate a count_tokens body (document blocks read by `files`); raises RequestInvalid."""
    try:
        return CountTokensRequest.model_validate_json(body, context={"files": files})
    except ValidationError as error:
        raise describe(error) from None


# Response shapes, for the OpenAPI schema only: the hot path builds plain dicts.


class AnthropicUsage(BaseModel):
    input_tokens: int
    output_tokens: int


class MessageResponse(BaseModel):
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    content: list[dict[str, Any]]
    model: str
    stop_reason: Literal["end_turn", "max_tokens", "stop_sequence", "tool_use", "refusal"]
    stop_sequence: str | None
    usage: AnthropicUsage


class TokenCount(BaseModel):
    input_tokens: int


class AnthropicErrorDetail(BaseModel):
    type: str
    message: str


class AnthropicError(BaseModel):
    type: Literal["error"] = "error"
    error: AnthropicErrorDetail
