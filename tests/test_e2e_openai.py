"""The whole mesh through Envoy with the official openai client, sync and async."""

from __future__ import annotations

import httpx
import openai
import pytest
from helpers import DEFAULT_MODEL, Mesh
from openai.types.chat import ChatCompletionMessageParam

pytestmark = pytest.mark.e2e

MESSAGES: list[ChatCompletionMessageParam] = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Name three colours."},
]


@pytest.fixture(scope="module")
def client(mesh: Mesh) -> openai.OpenAI:
    return mesh.openai_client()


@pytest.fixture
def aclient(mesh: Mesh) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{mesh.base_url}/v1", api_key="unused", max_retries=0)


def test_models_lists_the_default_model(client: openai.OpenAI) -> None:
    assert DEFAULT_MODEL in [m.id for m in client.models.list().data]


def test_chat_non_streaming(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=DEFAULT_MODEL, messages=MESSAGES, max_tokens=16, seed=1
    )
    assert len(reply.choices) == 1
    choice = reply.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert reply.usage is not None
    assert 0 < reply.usage.completion_tokens <= 16
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    assert reply.model == DEFAULT_MODEL


def test_chat_stream_without_usage(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model=DEFAULT_MODEL,
            messages=MESSAGES,
            max_tokens=16,
            stream=True,
        )
    )
    finishes = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert len(finishes) == 1
    assert chunks[-1].choices[0].finish_reason == finishes[0]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert all(c.usage is None for c in chunks)
    assert len({c.id for c in chunks}) == 1


def test_chat_stream_usage_only_in_final_chunk(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model=DEFAULT_MODEL,
            messages=MESSAGES,
            max_tokens=16,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    *body, last = chunks
    assert all(c.usage is None for c in body)
    assert last.usage is not None
    assert last.choices == []
    assert 0 < last.usage.completion_tokens <= 16
    finishes = [
        c.choices[0].finish_reason for c in body if c.choices and c.choices[0].finish_reason
    ]
    assert len(finishes) == 1


def test_completions_streaming_and_not(client: openai.OpenAI) -> None:
    reply = client.completions.create(model=DEFAULT_MODEL, prompt="The sky is", max_tokens=8)
    assert reply.choices[0].text
    assert reply.choices[0].finish_reason in ("stop", "length")
    chunks = list(
        client.completions.create(
            model=DEFAULT_MODEL, prompt="The sky is", max_tokens=8, stream=True
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices)
    assert len([c for c in chunks if c.choices and c.choices[0].finish_reason]) == 1


def test_stop_sequences_are_respected(client: openai.OpenAI) -> None:
    prompt = "The three primary colours are"
    full = (
        client.completions.create(model=DEFAULT_MODEL, prompt=prompt, max_tokens=24, temperature=0)
        .choices[0]
        .text
    )
    words = full.split()
    assert len(words) > 3, full
    stop = words[2]
    cut = client.completions.create(
        model=DEFAULT_MODEL, prompt=prompt, max_tokens=24, temperature=0, stop=[stop]
    ).choices[0]
    assert cut.finish_reason == "stop"
    assert stop not in cut.text
    assert cut.text == full[: full.index(stop)]
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model=DEFAULT_MODEL,
            prompt=prompt,
            max_tokens=24,
            temperature=0,
            stop=[stop],
            stream=True,
        )
        if c.choices
    )
    assert streamed == cut.text


def test_same_seed_same_text_at_temperature(client: openai.OpenAI) -> None:
    def ask(seed: int) -> str:
        reply = client.chat.completions.create(
            model=DEFAULT_MODEL,
            messages=MESSAGES,
            max_tokens=24,
            temperature=0.8,
            seed=seed,
        )
        return reply.choices[0].message.content or ""

    first = ask(1234)
    assert first
    assert ask(1234) == first
    assert ask(99) != first


async def test_async_client_streaming_and_not(aclient: openai.AsyncOpenAI) -> None:
    reply = await aclient.chat.completions.create(
        model=DEFAULT_MODEL, messages=MESSAGES, max_tokens=8
    )
    assert reply.choices[0].message.content
    stream = await aclient.chat.completions.create(
        model=DEFAULT_MODEL,
        messages=MESSAGES,
        max_tokens=8,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [c async for c in stream]
    assert chunks[-1].usage is not None
    assert len([c for c in chunks if c.choices and c.choices[0].finish_reason]) == 1
    await aclient.close()


def test_errors_map_to_openai_exceptions_and_mesh_survives(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as not_found:
        client.chat.completions.create(model="no-such-model", messages=MESSAGES)
    assert "no-such-model" in str(not_found.value)

    with pytest.raises(openai.BadRequestError) as too_long:
        client.completions.create(model=DEFAULT_MODEL, prompt="word " * 3000, max_tokens=4)
    assert "2048" in str(too_long.value)

    with pytest.raises(openai.BadRequestError) as bad_param:
        client.chat.completions.create(model=DEFAULT_MODEL, messages=MESSAGES, temperature=7)
    assert "temperature" in str(bad_param.value)

    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=DEFAULT_MODEL, messages=[])

    # The error in the middle of a stream request, before any byte was sent, is a normal error.
    with pytest.raises(openai.NotFoundError):
        list(client.chat.completions.create(model="nope", messages=MESSAGES, stream=True))

    reply = client.chat.completions.create(model=DEFAULT_MODEL, messages=MESSAGES, max_tokens=4)
    assert reply.choices[0].message.content is not None


def test_health_version_and_request_id(mesh: Mesh) -> None:
    assert httpx.get(f"{mesh.base_url}/healthz").status_code == 200
    assert httpx.get(f"{mesh.base_url}/readyz").status_code == 200
    assert httpx.get(f"{mesh.base_url}/version").json()["version"]
    response = httpx.post(
        f"{mesh.base_url}/v1/completions",
        json={"model": DEFAULT_MODEL, "prompt": "Hi", "max_tokens": 2},
        headers={"x-request-id": "e2e-request-1"},
    )
    assert response.status_code == 200
    assert response.headers["x-request-id"] == "e2e-request-1"
    assert response.json()["id"] == "cmpl-e2e-request-1"


def test_oversized_body_is_refused(mesh: Mesh) -> None:
    big = {"model": DEFAULT_MODEL, "prompt": "x" * (2 << 20)}
    assert httpx.post(f"{mesh.base_url}/v1/completions", json=big).status_code == 413


def test_full_sampling_parameters_reach_the_engine(client: openai.OpenAI) -> None:
    prompt = "The three primary colours are"

    def forced(token_id: int) -> str:
        reply = client.completions.create(
            model=DEFAULT_MODEL,
            prompt=prompt,
            max_tokens=1,
            temperature=0.9,
            seed=1,
            logit_bias={str(token_id): 100},
        )
        return reply.choices[0].text

    # A +100 bias forces its token whatever the sampler would have picked.
    assert forced(1000) == forced(1000)
    assert forced(1000) != forced(2000)
    reply = client.completions.create(
        model=DEFAULT_MODEL,
        prompt=prompt,
        max_tokens=8,
        temperature=0.7,
        seed=3,
        presence_penalty=0.5,
        frequency_penalty=0.5,
        extra_body={"top_k": 20, "min_p": 0.1, "repetition_penalty": 1.2},
    )
    assert reply.choices[0].text
    with pytest.raises(openai.BadRequestError, match="logit_bias"):
        client.completions.create(
            model=DEFAULT_MODEL, prompt=prompt, max_tokens=1, logit_bias={"abc": 1}
        )
    with pytest.raises(openai.BadRequestError, match="top_k"):
        client.completions.create(
            model=DEFAULT_MODEL, prompt=prompt, max_tokens=1, extra_body={"top_k": -1}
        )


def test_logprobs_chat_and_completions(client: openai.OpenAI) -> None:
    chat = client.chat.completions.create(
        model=DEFAULT_MODEL,
        messages=MESSAGES,
        max_tokens=4,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    content = chat.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content
    assert len(content) <= 4
    for entry in content:
        assert entry.logprob <= 0
        assert len(entry.top_logprobs) == 2
        # Greedy: the chosen token is the most likely one.
        assert entry.top_logprobs[0].token == entry.token
    assert "".join(e.token for e in content).startswith(chat.choices[0].message.content or "")

    completion = client.completions.create(
        model=DEFAULT_MODEL, prompt="The sky is", max_tokens=3, temperature=0, logprobs=1
    )
    lp = completion.choices[0].logprobs
    assert lp is not None
    assert lp.tokens
    assert lp.token_logprobs is not None
    assert len(lp.tokens) == len(lp.token_logprobs)
    streamed = [
        c.choices[0].logprobs
        for c in client.completions.create(
            model=DEFAULT_MODEL,
            prompt="The sky is",
            max_tokens=3,
            temperature=0,
            logprobs=1,
            stream=True,
        )
        if c.choices and c.choices[0].logprobs
    ]
    assert [t for s in streamed for t in (s.tokens or [])] == lp.tokens
    assert chat.choices[0].logprobs is not None
    plain = client.completions.create(model=DEFAULT_MODEL, prompt="Hi", max_tokens=2)
    assert plain.choices[0].logprobs is None
