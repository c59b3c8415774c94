"""Anthropic Messages wire models the gateway accepts, validated once at the HTTP edge."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import PydanticCustomError

from gateway.protocol import A_STRING, TOOL_NAME_PATTERN, AlsoAccepts, RequestInvalid, error_param

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


# Blocks only their own role may carry.
_ROLE_BLOCKS = {
    "user": frozenset({"text", "tool_result"}),
    "assistant": frozenset({"text", "tool_use", "thinking", "redacted_thinking"}),
}


class MessageParam(_Wire):
    role: Literal["user", "assistant"]
    content: Annotated[list[ContentBlock], BeforeValidator(_text_blocks), AlsoAccepts(A_STRING)]

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


def parse_messages(body: bytes) -> MessagesRequest:
    """Validate a Messages body straight from JSON bytes; raises RequestInvalid."""
    try:
        return MessagesRequest.model_validate_json(body)
    except ValidationError as error:
        raise describe(error) from None


def parse_count_tokens(body: bytes) -> CountTokensRequest:
    """Validate a count_tokens body; raises RequestInvalid."""
    try:
        return CountTokensRequest.model_validate_json(body)
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
