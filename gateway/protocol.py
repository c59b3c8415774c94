"""OpenAI wire models the gateway accepts, validated once at the HTTP edge."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal, Protocol, cast

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    GetJsonSchemaHandler,
    ValidationError,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema, PydanticCustomError

from gateway.documents import DocumentError

MAX_STOP_SEQUENCES = 4
# The default of GatewayConfig.max_n; parse_* take the configured value.
DEFAULT_MAX_N = 8
# OpenAI's rule for function names.
TOOL_NAME_PATTERN = r"^[a-zA-Z0-9_-]{1,64}$"
_UINT32_MAX = (1 << 32) - 1
_UINT64_MAX = (1 << 64) - 1


class FileTexts(Protocol):
    """What turns a file content part into text (gateway.files.Attachments): reads its inline
    data or its uploaded file, raising DocumentError for a file that gives no text."""

    def text_of(self, file: object) -> str: ...


def _flatten_content(value: Any, info: ValidationInfo) -> Any:
    """Accept a string or a list of text and file parts and hand pydantic one string.

    Normalising here keeps validation errors pointing at `content` itself instead of at the
    members of a union, and does the joining once, at parse time. A file part becomes the
    text of its file here, so that it is sanitised like any text from here on.
    """
    if value is None:
        return ""
    if isinstance(value, list):
        texts: list[str] = []
        for index, part in enumerate(value):
            if isinstance(part, dict) and part.get("type") == "file" and set(part) <= _FILE_KEYS:
                texts.append(_file_text(part.get("file"), index, info))
                continue
            if not (
                isinstance(part, dict)
                and part.get("type") == "text"
                and isinstance(part.get("text"), str)
            ):
                raise PydanticCustomError(
                    "content_part",
                    "only content parts of type 'text' with a string 'text', or of type 'file' "
                    "with a 'file' object, work",
                )
            texts.append(part["text"])
        # vLLM and llama.cpp's server join text parts with newlines too.
        return "\n".join(texts)
    return value


_FILE_KEYS = frozenset({"type", "file"})


def _file_text(file: object, index: int, info: ValidationInfo) -> str:
    files: FileTexts | None = (info.context or {}).get("files")
    field = f"{index}.file"
    if files is None:
        raise PydanticCustomError(
            "file_part", "file parts are not accepted here", {"field": f"{index}.type"}
        )
    try:
        return files.text_of(file)
    except DocumentError as error:
        # The reason travels in the context: a template would read braces in it as fields.
        raise PydanticCustomError(
            "file_part", "{reason}", {"reason": error.message, "field": field}
        ) from None


def _single_prompt(value: Any) -> Any:
    if isinstance(value, list):
        if len(value) == 1 and isinstance(value[0], str):
            return value[0]
        raise PydanticCustomError(
            "prompt_list", "prompt must be a string or a list holding exactly one string"
        )
    return value


def _stop_list(value: Any) -> Any:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    return value


class AlsoAccepts:
    """Annotation for a field whose BeforeValidator turns a shorthand (a string for a list of
    parts, "auto" for a tool_choice object) into the declared type: the document then states
    both forms, so that what the server takes is what the document says it takes."""

    def __init__(self, shorthand: dict[str, Any]) -> None:
        self.shorthand = shorthand

    def __get_pydantic_json_schema__(
        self, core_schema: CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        return {"anyOf": [self.shorthand, handler(core_schema)]}


class AlsoAcceptsItems:
    """Annotation for a list whose BeforeValidator also takes items of another form (a file
    part, a document block, read as text at parse): the document states both item forms."""

    def __init__(self, item: dict[str, Any]) -> None:
        self.item = item

    def __get_pydantic_json_schema__(
        self, core_schema: CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        schema = handler(core_schema)
        return {**schema, "items": {"anyOf": [schema["items"], self.item]}}


A_STRING: dict[str, Any] = {"type": "string"}


_TEXT_PART_SCHEMA = {
    "type": "object",
    "properties": {"type": {"const": "text"}, "text": {"type": "string"}},
    "required": ["type", "text"],
}
# OpenAI's file part: the file inline (base64, best as a data URL naming its media type) or
# the id of a file uploaded to /v1/files. PDF, DOCX, XLSX, Markdown and plain text are read.
FILE_PART_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "type": {"const": "file"},
        "file": {
            "type": "object",
            "properties": {
                "file_data": {
                    "type": "string",
                    "description": "The file, base64: 'data:application/pdf;base64,...' or bare.",
                },
                "file_id": {"type": "string", "description": "A file uploaded to /v1/files."},
                "filename": {"type": "string"},
            },
            "additionalProperties": False,
            "oneOf": [{"required": ["file_data"]}, {"required": ["file_id"]}],
        },
    },
    "required": ["type", "file"],
    "additionalProperties": False,
}

MessageContent = Annotated[
    str,
    BeforeValidator(_flatten_content),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string"},
                {"type": "array", "items": {"anyOf": [_TEXT_PART_SCHEMA, FILE_PART_SCHEMA]}},
                {"type": "null"},
            ]
        }
    ),
]
Prompt = Annotated[
    str,
    BeforeValidator(_single_prompt),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string"},
                {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 1},
            ]
        }
    ),
]
Stop = Annotated[
    list[str],
    BeforeValidator(_stop_list),
    Field(max_length=MAX_STOP_SEQUENCES),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string"},
                {"type": "array", "items": {"type": "string"}, "maxItems": MAX_STOP_SEQUENCES},
                {"type": "null"},
            ]
        }
    ),
]


class _Wire(BaseModel):
    # A field the mesh does not implement is refused by name, never dropped: a caller whose
    # `tools` or `response_format` vanished would get a well-formed answer to another question.
    # Strict: JSON's types as the document states them, so `false` is no 0 and `1` no true; a
    # value the document calls invalid must not be taken as some other value.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class StreamOptions(_Wire):
    include_usage: bool = False


class FunctionCall(_Wire):
    name: str = Field(pattern=TOOL_NAME_PATTERN)
    # The arguments object as JSON text, as OpenAI sends it.
    arguments: str


class ToolCallParam(_Wire):
    """A call an assistant turn made, as it comes back in the history."""

    id: str = Field(min_length=1)
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Wire):
    # "developer" is what newer OpenAI clients send in place of "system".
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: MessageContent = ""
    name: str | None = None
    tool_calls: list[ToolCallParam] | None = None
    tool_call_id: str | None = None
    # An earlier answer's reasoning (this gateway's own field), sent back by clients that append
    # the returned message as it is. Reasoning templates drop earlier turns' reasoning, so it is
    # accepted and not shown to the model, as vLLM does.
    reasoning_content: str | None = None

    @model_validator(mode="after")
    def _tool_fields_fit_the_role(self) -> ChatMessage:
        if self.tool_calls and self.role != "assistant":
            raise PydanticCustomError(
                "tool_calls", "only assistant messages carry tool_calls", {"field": "tool_calls"}
            )
        if self.role == "tool" and not self.tool_call_id:
            raise PydanticCustomError(
                "tool_call_id",
                "a tool message needs the tool_call_id it answers",
                {"field": "tool_call_id"},
            )
        if self.reasoning_content is not None and self.role != "assistant":
            raise PydanticCustomError(
                "reasoning_content",
                "only assistant messages carry reasoning_content",
                {"field": "reasoning_content"},
            )
        if self.tool_call_id is not None and self.role != "tool":
            raise PydanticCustomError(
                "tool_call_id", "only tool messages carry tool_call_id", {"field": "tool_call_id"}
            )
        return self


class FunctionDefinition(_Wire):
    name: str = Field(pattern=TOOL_NAME_PATTERN)
    description: str | None = None
    # A JSON Schema object; left out means any arguments object.
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDefinition(_Wire):
    # Only function tools: OpenAI's "custom" tools (free text, grammars) are not implemented.
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(_Wire):
    name: str = Field(pattern=TOOL_NAME_PATTERN)


def tool_choice_object(value: Any) -> Any:
    # "none" | "auto" | "required" arrive as strings, a named function as an object; one model
    # holds both, so errors name `tool_choice` or `tool_choice.function.name`, not a union arm.
    if isinstance(value, str):
        if value not in ("none", "auto", "required"):
            raise PydanticCustomError(
                "tool_choice", "tool_choice must be 'none', 'auto', 'required' or a function"
            )
        return {"type": value}
    return value


class ToolChoiceParam(_Wire):
    type: Literal["none", "auto", "required", "function"]
    function: FunctionName | None = None

    @model_validator(mode="after")
    def _function_named(self) -> ToolChoiceParam:
        if (self.type == "function") != (self.function is not None):
            raise PydanticCustomError(
                "tool_choice", "a function is named exactly when tool_choice.type is 'function'"
            )
        return self


ToolChoiceField = Annotated[
    ToolChoiceParam,
    BeforeValidator(tool_choice_object),
    WithJsonSchema(
        {
            "anyOf": [
                {"enum": ["none", "auto", "required"]},
                {
                    "type": "object",
                    "properties": {
                        "type": {"const": "function"},
                        "function": {
                            "type": "object",
                            "properties": {"name": {"type": "string"}},
                            "required": ["name"],
                        },
                    },
                    "required": ["type", "function"],
                },
            ]
        }
    ),
]


class JsonSchemaFormat(_Wire):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    # `schema` would shadow a BaseModel attribute; the wire name stays OpenAI's.
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None


class ResponseFormatParam(_Wire):
    """OpenAI's response_format: text, any JSON object, or JSON valid against a schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self) -> ResponseFormatParam:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise PydanticCustomError(
                "response_format",
                "json_schema is given exactly when response_format.type is 'json_schema'",
            )
        return self


_CONSTRAINT_FIELDS = (
    "response_format",
    "guided_json",
    "guided_regex",
    "guided_choice",
    "guided_grammar",
)


class _GenerationRequest(_Wire):
    model: str = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1, le=_UINT32_MAX)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    stop: Stop = []
    seed: int | None = Field(default=None, ge=0, le=_UINT64_MAX)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    # Token id (as a string, as OpenAI sends it) -> bias in [-100, 100].
    logit_bias: dict[str, float] | None = None
    # vLLM's extensions, which llama.cpp's server accepts too.
    top_k: int | None = Field(default=None, ge=0, le=_UINT32_MAX)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(default=None, gt=0.0, le=10.0)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(default=1, ge=1)
    # An end-user id for the caller's own abuse tracking; it changes nothing in the answer.
    user: str | None = None
    # Constrained decoding: OpenAI's response_format, or one of vLLM's guided_* extensions.
    response_format: ResponseFormatParam | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = Field(default=None, min_length=1)
    guided_choice: list[str] | None = Field(default=None, min_length=1)
    # llama.cpp's GBNF, as vLLM's xgrammar backend reads guided_grammar.
    guided_grammar: str | None = Field(default=None, min_length=1)

    @field_validator("logit_bias")
    @classmethod
    def _token_ids(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for token, bias in (value or {}).items():
            if not token.isdigit() or int(token) > 2**31 - 1:
                raise PydanticCustomError("logit_bias", "logit_bias keys must be token ids")
            if not -100.0 <= bias <= 100.0:
                raise PydanticCustomError("logit_bias", "logit_bias values must be in [-100, 100]")
        return value

    @field_validator("n")
    @classmethod
    def _choices_within_limit(cls, value: int | None, info: ValidationInfo) -> int | None:
        limit = (info.context or {}).get("max_n", DEFAULT_MAX_N)
        if value is not None and value > limit:
            raise PydanticCustomError(
                "n_too_large", "n may be at most {limit} on this server", {"limit": limit}
            )
        return value

    @field_validator("guided_json")
    @classmethod
    def _schema_text_is_json(
        cls, value: dict[str, Any] | str | None
    ) -> dict[str, Any] | str | None:
        if isinstance(value, str):
            try:
                parsed = json.loads(value)
            except ValueError:
                raise PydanticCustomError("guided_json", "guided_json is not valid JSON") from None
            if not isinstance(parsed, dict):
                raise PydanticCustomError("guided_json", "guided_json must be a JSON Schema object")
            return cast(dict[str, Any], parsed)
        return value

    @model_validator(mode="after")
    def _one_constraint(self) -> _GenerationRequest:
        given = [name for name in _CONSTRAINT_FIELDS if getattr(self, name) is not None]
        if self.response_format is not None and self.response_format.type == "text":
            given.remove("response_format")
        if len(given) > 1:
            raise PydanticCustomError(
                "constraint",
                "{field} cannot be combined with {first}: give one output constraint",
                {"first": given[0], "field": given[1]},
            )
        return self

    @field_validator("stream_options")
    @classmethod
    def _options_need_stream(
        cls, value: StreamOptions | None, info: ValidationInfo
    ) -> StreamOptions | None:
        # OpenAI refuses stream_options without stream=true; so does the gateway.
        if value is not None and not info.data.get("stream"):
            raise PydanticCustomError(
                "stream_options", "stream_options is only allowed when stream is true"
            )
        return value

    @property
    def streaming(self) -> bool:
        return bool(self.stream)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    @property
    def token_limit(self) -> int | None:
        return self.max_tokens

    @property
    def logprob_request(self) -> tuple[bool, int]:
        """Whether token log probabilities were asked, and how many alternatives each."""
        return False, 0

    @property
    def choices(self) -> int:
        return self.n or 1


class ChatCompletionRequest(_GenerationRequest):
    """Body of POST /v1/chat/completions."""

    # Examples a reader (and a fuzzer's examples phase) can send as they are: short answers.
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "model": "gemma-3-270m",
                    "messages": [
                        {"role": "system", "content": "You are terse."},
                        {"role": "user", "content": "Name three colours."},
                    ],
                    "max_tokens": 8,
                    "temperature": 0,
                },
                {
                    "model": "gemma-3-270m",
                    "messages": [{"role": "user", "content": "Say hello."}],
                    "max_tokens": 4,
                    "stream": True,
                    "stream_options": {"include_usage": True},
                },
            ]
        }
    )

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=_UINT32_MAX)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    # An empty list is taken as no tools, as LangChain and others send it.
    tools: list[ToolDefinition] | None = None
    tool_choice: ToolChoiceField | None = None
    parallel_tool_calls: bool | None = None
    # Tags for OpenAI's stored-completions dashboard; they change nothing in the answer.
    metadata: dict[str, str] | None = None
    # Nothing is stored here, so only "don't store" is true; store=true is refused.
    store: bool | None = None

    @field_validator("store")
    @classmethod
    def _nothing_stored(cls, value: bool | None) -> bool | None:
        if value:
            raise PydanticCustomError("store", "this server does not store completions")
        return value

    @field_validator("tool_choice")
    @classmethod
    def _choice_among_tools(
        cls, value: ToolChoiceParam | None, info: ValidationInfo
    ) -> ToolChoiceParam | None:
        if value is None:
            return value
        tools: list[ToolDefinition] = info.data.get("tools") or []
        if not tools:
            raise PydanticCustomError(
                "tool_choice", "tool_choice is only allowed when tools are specified"
            )
        if value.function is not None and value.function.name not in {
            t.function.name for t in tools
        }:
            raise PydanticCustomError(
                "tool_choice", "tool_choice names a function that is not among tools"
            )
        return value

    @field_validator("parallel_tool_calls")
    @classmethod
    def _parallel_needs_tools(cls, value: bool | None, info: ValidationInfo) -> bool | None:
        if value is not None and not info.data.get("tools"):
            raise PydanticCustomError(
                "parallel_tool_calls",
                "parallel_tool_calls is only allowed when tools are specified",
            )
        return value

    @field_validator("tools")
    @classmethod
    def _unique_names(cls, value: list[ToolDefinition] | None) -> list[ToolDefinition] | None:
        names = [t.function.name for t in value or []]
        if len(names) != len(set(names)):
            raise PydanticCustomError("tools", "tool names must be unique")
        return value

    @property
    def logprob_request(self) -> tuple[bool, int]:
        return bool(self.logprobs), self.top_logprobs or 0

    @property
    def token_limit(self) -> int | None:
        # The newer field wins, as in OpenAI's API.
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens
        return self.max_tokens


class CompletionRequest(_GenerationRequest):
    """Body of POST /v1/completions."""

    # Examples a reader (and a fuzzer's examples phase) can send as they are: short answers.
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"model": "gemma-3-270m", "prompt": "The capital of France is", "max_tokens": 4},
                {"model": "gemma-3-270m", "prompt": "One, two,", "max_tokens": 4, "stream": True},
            ]
        }
    )

    prompt: Prompt
    # The legacy API: the number of alternatives per token (0-5) turns logprobs on.
    logprobs: int | None = Field(default=None, ge=0, le=5)

    @property
    def logprob_request(self) -> tuple[bool, int]:
        return self.logprobs is not None, self.logprobs or 0


class RequestInvalid(Exception):
    """A request body that does not validate; carries what OpenAI's error shape needs."""

    def __init__(self, message: str, param: str | None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


def error_param(loc: tuple[int | str, ...]) -> str | None:
    """`("messages", 0, "content")` -> `"messages[0].content"`, the way OpenAI names params."""
    param = ""
    for part in loc:
        if isinstance(part, int):
            param += f"[{part}]"
        else:
            param += f".{part}" if param else part
    return param or None


def describe(error: ValidationError) -> RequestInvalid:
    """The first problem of a validation error, as one message and the param it concerns."""
    first = error.errors(include_url=False, include_input=False)[0]
    loc = tuple(first["loc"])
    # A check across fields names the one it blames in its context, under the object it ran on.
    field = (first.get("ctx") or {}).get("field")
    if isinstance(field, str):
        # A dotted path below it, indices as digits: "1.file" is content[1].file.
        loc = (*loc, *(int(p) if p.isdigit() else p for p in field.split(".")))
    param = error_param(loc)
    kind = first["type"]
    if kind == "missing" and param is not None:
        return RequestInvalid(f"Missing required parameter: '{param}'.", param)
    if kind == "extra_forbidden" and param is not None:
        # OpenAI's own wording, which clients and their tests look for.
        return RequestInvalid(f"Unrecognized request argument supplied: {param}", param)
    if kind == "json_invalid":
        return RequestInvalid("The request body is not valid JSON.", None)
    if param is None:
        return RequestInvalid(f"Invalid request body: {first['msg']}.", None)
    return RequestInvalid(f"Invalid value for '{param}': {first['msg']}.", param)


def request_body_doc(model: type[BaseModel]) -> dict[str, Any]:
    """OpenAPI for a route that parses a flat `model` (no nested models) from its JSON body
    itself, to answer in its own error shape: the schema inline, so no app wiring is needed."""
    schema = model.model_json_schema(mode="validation")
    assert "$defs" not in schema, f"{model.__name__} nests models: list it in the app instead"
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def parse_chat(
    body: bytes, max_n: int = DEFAULT_MAX_N, files: FileTexts | None = None
) -> ChatCompletionRequest:
    """Validate a chat body straight from JSON bytes, file parts read by `files` (without it,
    they are refused); raises RequestInvalid. Reading files blocks: run it in a thread."""
    try:
        return ChatCompletionRequest.model_validate_json(
            body, context={"max_n": max_n, "files": files}
        )
    except ValidationError as error:
        raise describe(error) from None


def parse_completion(body: bytes, max_n: int = DEFAULT_MAX_N) -> CompletionRequest:
    """Validate a completions body straight from JSON bytes; raises RequestInvalid."""
    try:
        return CompletionRequest.model_validate_json(body, context={"max_n": max_n})
    except ValidationError as error:
        raise describe(error) from None


# Response shapes, for the OpenAPI schema only: the hot path builds plain dicts.


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: dict[str, str]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    # null when the turn is only tool calls.
    content: str | None
    tool_calls: list[ToolCallOut] | None = None
    # vLLM's field for reasoning an upstream separated from the answer.
    reasoning_content: str | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: dict[str, Any] | None = None
    finish_reason: Literal["stop", "length", "content_filter", "tool_calls"]


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: dict[str, Any] | None = None
    finish_reason: Literal["stop", "length", "content_filter"]


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class Model(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Model]


class ErrorDetail(BaseModel):
    message: str
    type: str
    # The gateway always sends both (null when they do not apply); Envoy's own replies (503
    # when no gateway answers, 413 over the body limit) leave out `param`.
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
