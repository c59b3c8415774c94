"""Responses API wire models the gateway accepts, validated once at the HTTP edge.

State: none. This gateway does not store responses, so `store` must be false or left out (the
answer says "store": false), `previous_response_id` and `conversation` are refused, and there is
no GET or DELETE /v1/responses/{id}: clients send the whole conversation as `input`, as the
OpenAI Agents SDK does by default.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
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
    _Wire,
    describe,
    tool_choice_object,
)

_UINT32_MAX = (1 << 32) - 1


class ContentPart(_Wire):
    """A text part of a message: input_text, or output_text when an earlier answer comes back."""

    type: Literal["input_text", "output_text"]
    text: str
    # What output_text carries when a client sends an earlier output item back unchanged.
    annotations: list[Any] | None = None
    logprobs: list[Any] | None = None


def _parts(value: Any, info: ValidationInfo) -> Any:
    if isinstance(value, str):
        return [{"type": "input_text", "text": value}]
    if isinstance(value, list):
        # An input_file part becomes the text of its file here, so that it is sanitised like
        # any text from here on (see gateway.protocol's file parts).
        return [
            _file_as_text(part, index, info)
            if isinstance(part, dict) and part.get("type") == "input_file"
            else part
            for index, part in enumerate(value)
        ]
    return value


def _file_as_text(part: dict[str, Any], index: int, info: ValidationInfo) -> dict[str, Any]:
    files: FileTexts | None = (info.context or {}).get("files")
    if files is None:
        raise PydanticCustomError(
            "input_file", "input_file parts are not accepted here", {"field": f"{index}.type"}
        )
    try:
        text = files.text_of({k: v for k, v in part.items() if k != "type"})
    except DocumentError as error:
        raise PydanticCustomError(
            "input_file", "{reason}", {"reason": error.message, "field": str(index)}
        ) from None
    return {"type": "input_text", "text": text}


_INPUT_FILE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "type": {"const": "input_file"},
        "file_data": {"type": "string", "description": "The file, base64, best as a data URL."},
        "file_id": {"type": "string", "description": "A file uploaded to /v1/files."},
        "filename": {"type": "string"},
    },
    "required": ["type"],
    "additionalProperties": False,
    "oneOf": [{"required": ["file_data"]}, {"required": ["file_id"]}],
}


Parts = Annotated[
    list[ContentPart],
    BeforeValidator(_parts),
    AlsoAcceptsItems(_INPUT_FILE_SCHEMA),
    AlsoAccepts(A_STRING),
]

# type: (required, allowed) fields beyond `type`.
_ITEM_FIELDS: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "message": (frozenset({"role", "content"}), frozenset({"role", "content", "id", "status"})),
    "function_call": (
        frozenset({"call_id", "name", "arguments"}),
        frozenset({"call_id", "name", "arguments", "id", "status"}),
    ),
    "function_call_output": (
        frozenset({"call_id", "output"}),
        frozenset({"call_id", "output", "id", "status"}),
    ),
    # An earlier answer's reasoning, sent back by clients that replay output items. OpenAI does
    # not show a non-reasoning model its earlier reasoning either; it is accepted and not shown.
    "reasoning": (
        frozenset({"summary"}),
        frozenset({"summary", "id", "content", "encrypted_content", "status"}),
    ),
}


class InputItem(_Wire):
    """One item of `input`. One model for every type, so that errors name `input[i].field`."""

    # A message may leave its type out (EasyInputMessage).
    type: Literal["message", "function_call", "function_call_output", "reasoning"] = "message"
    role: Literal["user", "system", "developer", "assistant"] | None = None
    content: Parts | None = None
    id: str | None = None
    status: Literal["in_progress", "completed", "incomplete"] | None = None
    call_id: str | None = Field(default=None, min_length=1)
    name: str | None = Field(default=None, pattern=TOOL_NAME_PATTERN)
    arguments: str | None = None
    output: Parts | None = None
    summary: list[Any] | None = None
    encrypted_content: str | None = None

    @model_validator(mode="after")
    def _fields_of_its_type(self) -> InputItem:
        required, allowed = _ITEM_FIELDS[self.type]
        given = {name for name in self.model_fields_set if name != "type"}
        for name in sorted(required - given):
            raise PydanticCustomError(
                "item_field", "a {kind} item needs {field}", {"kind": self.type, "field": name}
            )
        for name in sorted(given - allowed):
            raise PydanticCustomError(
                "item_field",
                "a {kind} item does not take {field}",
                {"kind": self.type, "field": name},
            )
        return self

    @property
    def text(self) -> str:
        return "\n".join(p.text for p in self.content or [])

    @property
    def output_text(self) -> str:
        return "\n".join(p.text for p in self.output or [])


def _input_items(value: Any) -> Any:
    if isinstance(value, str):
        return [{"type": "message", "role": "user", "content": value}]
    return value


class FunctionTool(_Wire):
    # Only function tools; web_search, file_search, computer_use, mcp, ... are refused by type.
    type: Literal["function"]
    name: str = Field(pattern=TOOL_NAME_PATTERN)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolChoiceParam(_Wire):
    type: Literal["none", "auto", "required", "function"]
    name: str | None = None

    @model_validator(mode="after")
    def _function_named(self) -> ToolChoiceParam:
        if (self.type == "function") != (self.name is not None):
            raise PydanticCustomError(
                "tool_choice", "a name is given exactly when tool_choice.type is 'function'"
            )
        return self

    def wire(self) -> str | dict[str, str]:
        """As the Response object echoes it."""
        if self.name is not None:
            return {"type": "function", "name": self.name}
        return self.type


class TextFormat(_Wire):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = Field(default=None, pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    # `schema` would shadow a BaseModel attribute; the wire name stays OpenAI's.
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None

    @model_validator(mode="after")
    def _schema_fields(self) -> TextFormat:
        extra = {"name", "description", "schema_", "strict"} & self.model_fields_set
        if self.type != "json_schema" and extra:
            field = "schema" if "schema_" in extra else sorted(extra)[0]
            raise PydanticCustomError(
                "text_format",
                "only a json_schema format takes {field}",
                {"field": field},
            )
        if self.type == "json_schema":
            for field, value in (("name", self.name), ("schema", self.schema_)):
                if value is None:
                    raise PydanticCustomError(
                        "text_format", "a json_schema format needs {field}", {"field": field}
                    )
        return self


class TextConfig(_Wire):
    format: TextFormat | None = None


class ResponsesRequest(_Wire):
    """Body of POST /v1/responses."""

    # Examples a reader (and a fuzzer's examples phase) can send as they are: short answers.
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"model": "gemma-3-270m", "input": "Name three colours.", "max_output_tokens": 8}
            ]
        }
    )

    model: str = Field(min_length=1)
    input: Annotated[
        list[InputItem], BeforeValidator(_input_items), Field(min_length=1), AlsoAccepts(A_STRING)
    ]
    instructions: str | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: (
        Annotated[
            ToolChoiceParam,
            BeforeValidator(tool_choice_object),
            AlsoAccepts({"enum": ["none", "auto", "required"]}),
        ]
        | None
    ) = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    max_output_tokens: int | None = Field(default=None, ge=1, le=_UINT32_MAX)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    stream: bool | None = None
    # Echoed in the answer; they change nothing in it.
    metadata: dict[str, str] | None = None
    user: str | None = None
    # Declared so that their refusals say why; see the module docstring.
    store: bool | None = None
    previous_response_id: str | None = None
    include: list[str] | None = None
    truncation: Literal["disabled", "auto"] | None = None
    reasoning: dict[str, Any] | None = None
    background: bool | None = None

    @field_validator("store")
    @classmethod
    def _nothing_stored(cls, value: bool | None) -> bool | None:
        if value:
            raise PydanticCustomError(
                "store", "this server does not store responses; send store=false or leave it out"
            )
        return value

    @field_validator("previous_response_id")
    @classmethod
    def _no_previous(cls, value: str | None) -> str | None:
        if value is not None:
            raise PydanticCustomError(
                "previous_response_id",
                "this server does not store responses; send the whole conversation as input",
            )
        return value

    @field_validator("include")
    @classmethod
    def _nothing_included(cls, value: list[str] | None) -> list[str] | None:
        if value:
            raise PydanticCustomError("include", "no additional output data is available here")
        return value

    @field_validator("truncation")
    @classmethod
    def _no_truncation(cls, value: str | None) -> str | None:
        if value == "auto":
            raise PydanticCustomError(
                "truncation", "only truncation 'disabled' is supported: prompts are never cut"
            )
        return value

    @field_validator("reasoning")
    @classmethod
    def _no_reasoning_config(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None:
            raise PydanticCustomError("reasoning", "reasoning options are not supported")
        return value

    @field_validator("background")
    @classmethod
    def _no_background(cls, value: bool | None) -> bool | None:
        if value:
            raise PydanticCustomError("background", "background responses are not supported")
        return value

    @field_validator("tool_choice")
    @classmethod
    def _choice_among_tools(
        cls, value: ToolChoiceParam | None, info: ValidationInfo
    ) -> ToolChoiceParam | None:
        tools: list[FunctionTool] = info.data.get("tools") or []
        if value is None:
            return value
        if value.type in ("required", "function") and not tools:
            raise PydanticCustomError(
                "tool_choice", "tool_choice '{kind}' needs tools", {"kind": value.type}
            )
        if value.name is not None and value.name not in {t.name for t in tools}:
            raise PydanticCustomError(
                "tool_choice", "tool_choice names a function that is not among tools"
            )
        return value

    @field_validator("tools")
    @classmethod
    def _unique_names(cls, value: list[FunctionTool] | None) -> list[FunctionTool] | None:
        names = [t.name for t in value or []]
        if len(names) != len(set(names)):
            raise PydanticCustomError("tools", "tool names must be unique")
        return value


def parse_responses(body: bytes, files: FileTexts | None = None) -> ResponsesRequest:
    """Validate a Responses body straight from JSON bytes, input_file parts read by `files`
    (without it, they are refused); raises RequestInvalid. Reading files blocks: use a thread."""
    try:
        return ResponsesRequest.model_validate_json(body, context={"files": files})
    except ValidationError as error:
        raise describe(error) from None
