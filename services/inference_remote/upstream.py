"""One OpenAI-compatible HTTP upstream: streaming completions, health probes, runtime LoRA."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import httpx

Kind = Literal["vllm", "openai", "external"]
# Enough of an error body to quote; the rest is dropped.
MAX_ERROR_BODY = 4096


class UpstreamFailure(Exception):
    """The upstream did not serve the call; another upstream may."""

    def __init__(self, reason: str, message: str, *, unhealthy: bool = False) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        # The upstream looks down, not merely busy or wrong about this one request.
        self.unhealthy = unhealthy


class UpstreamRejected(Exception):
    """The upstream refused the request itself (HTTP 400/422): no other upstream will differ."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class ToolCallPiece:
    """A piece of a streamed call: index always, id and name on the first piece."""

    index: int
    id: str = ""
    name: str = ""
    arguments: str = ""


@dataclass(frozen=True)
class ChoiceChunk:
    """What one event says about one choice."""

    index: int = 0
    text: str = ""
    reasoning: str = ""
    tool_calls: tuple[ToolCallPiece, ...] = ()
    finish_reason: str | None = None
    # vLLM's stop_reason: the stop string that ended the choice (an int is a stop token id).
    stop_sequence: str = ""

    @property
    def has_content(self) -> bool:
        return bool(self.text or self.reasoning or self.tool_calls)


@dataclass(frozen=True)
class Chunk:
    """One parsed event of an OpenAI stream."""

    choices: tuple[ChoiceChunk, ...] = ()
    prompt_tokens: int | None = None
    completion_tokens: int | None = None

    @property
    def has_content(self) -> bool:
        return any(choice.has_content for choice in self.choices)


@dataclass(frozen=True)
class Timeouts:
    connect_s: float
    first_token_s: float
    read_s: float


def _error_message(status: int, body: bytes) -> str:
    text = body[:MAX_ERROR_BODY].decode("utf-8", "replace")
    try:
        parsed = json.loads(text)
    except ValueError:
        return f"HTTP {status}: {text.strip()[:200]}"
    if isinstance(parsed, dict):
        error = parsed.get("error", parsed)
        if isinstance(error, dict):
            message = error.get("message") or error.get("detail")
            if message:
                return f"HTTP {status}: {message}"
        if isinstance(error, str):
            return f"HTTP {status}: {error}"
        if "detail" in parsed:
            return f"HTTP {status}: {parsed['detail']}"
    return f"HTTP {status}"


def _str(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _tool_call_pieces(calls: Any) -> tuple[ToolCallPiece, ...]:
    pieces = []
    for position, call in enumerate(calls if isinstance(calls, list) else ()):
        if not isinstance(call, dict):
            continue
        function = call.get("function") or {}
        index = call.get("index")
        pieces.append(
            ToolCallPiece(
                # Some servers omit the index when they send whole calls; their order is it then.
                index=index if isinstance(index, int) else position,
                id=_str(call.get("id")),
                name=_str(function.get("name")),
                arguments=_str(function.get("arguments")),
            )
        )
    return tuple(pieces)


def _choice(choice: Mapping[str, Any], position: int, chat: bool) -> ChoiceChunk:
    index = choice.get("index")
    index = index if isinstance(index, int) else position
    finish = choice.get("finish_reason") or None
    stop = _str(choice.get("stop_reason"))
    if not chat:
        return ChoiceChunk(
            index=index, text=_str(choice.get("text")), finish_reason=finish, stop_sequence=stop
        )
    delta = choice.get("delta") or {}
    return ChoiceChunk(
        index=index,
        text=_str(delta.get("content")),
        # vLLM's reasoning parsers: "reasoning_content" before 0.10, "reasoning" since.
        reasoning=_str(delta.get("reasoning_content")) or _str(delta.get("reasoning")),
        tool_calls=_tool_call_pieces(delta.get("tool_calls")),
        finish_reason=finish,
        stop_sequence=stop,
    )


def parse_chunk(data: Mapping[str, Any], chat: bool) -> Chunk:
    """A chunk of /v1/completions or /v1/chat/completions; an error event raises."""
    if "error" in data:
        error = data["error"]
        message = error.get("message", str(error)) if isinstance(error, dict) else str(error)
        raise UpstreamFailure("STREAM_ERROR", f"error event in the stream: {message}")
    choices = tuple(
        _choice(choice, position, chat)
        for position, choice in enumerate(data.get("choices") or [])
        if isinstance(choice, dict)
    )
    usage = data.get("usage") or {}
    return Chunk(
        choices=choices,
        prompt_tokens=usage.get("prompt_tokens"),
        completion_tokens=usage.get("completion_tokens"),
    )


class UpstreamClient:
    """HTTP to one upstream, pooled connections; an async context manager."""

    def __init__(
        self,
        base_url: str,
        timeouts: Timeouts,
        *,
        api_key: str | None = None,
        max_connections: int = 16,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._timeouts = timeouts
        headers = {"accept": "application/json"}
        if api_key:
            headers["authorization"] = f"Bearer {api_key}"
        # Reads are bounded per event by the caller (first token, then between chunks).
        self._http = httpx.AsyncClient(
            headers=headers,
            timeout=httpx.Timeout(None, connect=timeouts.connect_s, pool=timeouts.connect_s),
            limits=httpx.Limits(
                max_connections=max_connections, max_keepalive_connections=max_connections
            ),
            transport=transport,
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    async def probe(self) -> bool:
        """Whether the upstream answers GET /models (vLLM, llama.cpp and OpenAI all do)."""
        try:
            response = await self._http.get(
                f"{self.base_url}/models", timeout=self._timeouts.connect_s
            )
        except httpx.HTTPError:
            return False
        return response.status_code == 200

    async def load_lora_adapter(self, name: str, path: str) -> None:
        """vLLM's POST /v1/load_lora_adapter; an adapter it already has counts as loaded."""
        await self._lora_call("load_lora_adapter", {"lora_name": name, "lora_path": path})

    async def unload_lora_adapter(self, name: str) -> None:
        await self._lora_call("unload_lora_adapter", {"lora_name": name})

    async def _lora_call(self, route: str, body: dict[str, str]) -> None:
        try:
            response = await self._http.post(
                f"{self.base_url}/{route}", json=body, timeout=self._timeouts.first_token_s
            )
        except httpx.TransportError as error:
            raise UpstreamFailure("CONNECT", f"{route}: {error!r}", unhealthy=True) from error
        if response.status_code == 200:
            return
        message = _error_message(response.status_code, response.content)
        # vLLM answers 400 "... has already been loaded" to a second load of the same name.
        if route == "load_lora_adapter" and "already been loaded" in message:
            return
        raise UpstreamFailure("LORA_LOAD", f"{route} of {body['lora_name']!r}: {message}")

    async def tokenize_count(self, body: dict[str, Any]) -> int:
        """vLLM's POST /tokenize (beside /v1, not under it): the prompt's token count."""
        root = self.base_url.removesuffix("/v1")
        try:
            response = await self._http.post(
                f"{root}/tokenize", json=body, timeout=self._timeouts.first_token_s
            )
        except httpx.TransportError as error:
            raise UpstreamFailure("CONNECT", f"tokenize: {error!r}", unhealthy=True) from error
        if response.status_code in (400, 422):
            raise UpstreamRejected(
                response.status_code, _error_message(response.status_code, response.content)
            )
        if response.status_code != 200:
            raise UpstreamFailure(
                f"HTTP_{response.status_code}",
                _error_message(response.status_code, response.content),
            )
        try:
            count = response.json()["count"]
        except (ValueError, KeyError, TypeError) as error:
            raise UpstreamFailure("BAD_EVENT", "tokenize answered without a count") from error
        if not isinstance(count, int):
            raise UpstreamFailure("BAD_EVENT", "tokenize answered without a count")
        return count

    async def stream(self, path: str, body: dict[str, Any]) -> AsyncIterator[Chunk]:
        """POST a streaming request and yield its chunks until [DONE].

        Leaving the iterator early (cancellation included) closes the response, and with it
        the connection, so the upstream stops generating at once.
        """
        chat = path == "/chat/completions"
        try:
            async with self._http.stream("POST", f"{self.base_url}{path}", json=body) as response:
                if response.status_code != 200:
                    content = await response.aread()
                    message = _error_message(response.status_code, content)
                    if response.status_code in (400, 422):
                        raise UpstreamRejected(response.status_code, message)
                    raise UpstreamFailure(f"HTTP_{response.status_code}", message)
                lines = response.aiter_lines()
                timeout = self._timeouts.first_token_s
                while True:
                    try:
                        async with asyncio.timeout(timeout):
                            line = await anext(lines)
                    except StopAsyncIteration:
                        raise UpstreamFailure(
                            "TRUNCATED", "the stream ended without [DONE]"
                        ) from None
                    except TimeoutError:
                        raise UpstreamFailure(
                            "TIMEOUT", f"no data from the upstream for {timeout:g}s"
                        ) from None
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        return
                    try:
                        parsed = json.loads(data)
                    except ValueError as error:
                        raise UpstreamFailure(
                            "BAD_EVENT", f"unparsable event: {data[:100]}"
                        ) from error
                    chunk = parse_chunk(parsed, chat)
                    if chunk.has_content:
                        timeout = self._timeouts.read_s
                    yield chunk
        except httpx.ConnectError as error:
            raise UpstreamFailure(
                "CONNECT", f"cannot connect: {error!r}", unhealthy=True
            ) from error
        except httpx.TimeoutException as error:
            raise UpstreamFailure(
                "CONNECT", f"timed out connecting: {error!r}", unhealthy=True
            ) from error
        except httpx.TransportError as error:
            raise UpstreamFailure(
                "TRANSPORT", f"connection lost: {error!r}", unhealthy=True
            ) from error
