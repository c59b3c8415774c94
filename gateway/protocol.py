"""OpenAI wire models the gateway accepts, validated once at the HTTP edge."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
)
from pydantic_core import PydanticCustomError

MAX_STOP_SEQUENCES = 4
_UINT32_MAX = (1 << 32) - 1
_UINT64_MAX = (1 << 64) - 1


def _flatten_content(value: Any) -> Any:
    """Accept a string or a list of text parts and hand pydantic one string.

    Normalising here keeps validation errors pointing at `content` itself instead of at the
    members of a union, and does the joining once, at parse time.
    """
    if value is None:
        return ""
    if isinstance(value, list):
        texts: list[str] = []
        for part in value:
            if not (
                isinstance(part, dict)
                and part.get("type") == "text"
                and isinstance(part.get("text"), str)
            ):
                raise PydanticCustomError(
                    "content_part", "only content parts of type 'text' with a string 'text' work"
                )
            texts.append(part["text"])
        # vLLM and llama.cpp's server join text parts with newlines too.
        return "\n".join(texts)
    return value


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


_TEXT_PART_SCHEMA = {
    "type": "object",
    "properties": {"type": {"const": "text"}, "text": {"type": "string"}},
    "required": ["type", "text"],
}

MessageContent = Annotated[
    str,
    BeforeValidator(_flatten_content),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string"},
                {"type": "array", "items": _TEXT_PART_SCHEMA},
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
    # OpenAI clients send fields this mesh does not implement; ignoring them is what vLLM and
    # llama.cpp's server do, and it keeps newer clients working.
    model_config = ConfigDict(extra="ignore", frozen=True)


class StreamOptions(_Wire):
    include_usage: bool = False


class ChatMessage(_Wire):
    # "developer" is what newer OpenAI clients send in place of "system".
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: MessageContent = ""
    name: str | None = None


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
    n: int | None = 1
    user: str | None = None

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
    def _only_one_choice(cls, value: int | None) -> int | None:
        if value not in (None, 1):
            raise PydanticCustomError("n_unsupported", "only n=1 is supported")
        return value

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


class ChatCompletionRequest(_GenerationRequest):
    """Body of POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=_UINT32_MAX)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)

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
    param = error_param(tuple(first["loc"]))
    kind = first["type"]
    if kind == "missing" and param is not None:
        return RequestInvalid(f"Missing required parameter: '{param}'.", param)
    if kind == "json_invalid":
        return RequestInvalid("The request body is not valid JSON.", None)
    if param is None:
        return RequestInvalid(f"Invalid request body: {first['msg']}.", None)
    return RequestInvalid(f"Invalid value for '{param}': {first['msg']}.", param)


def parse_chat(body: bytes) -> ChatCompletionRequest:
    """Validate a chat body straight from JSON bytes; raises RequestInvalid."""
    try:
        return ChatCompletionRequest.model_validate_json(body)
    except ValidationError as error:
        raise describe(error) from None


def parse_completion(body: bytes) -> CompletionRequest:
    """Validate a completions body straight from JSON bytes; raises RequestInvalid."""
    try:
        return CompletionRequest.model_validate_json(body)
    except ValidationError as error:
        raise describe(error) from None


# Response shapes, for the OpenAPI schema only: the hot path builds plain dicts.


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: dict[str, Any] | None = None
    finish_reason: Literal["stop", "length", "content_filter"]


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
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorDetail
