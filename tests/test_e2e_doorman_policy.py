"""The Doorman's policy through the whole mesh (Envoy, gateway, Doorman, engine) with openai."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import openai
import pytest
from helpers import DEFAULT_MODEL, Mesh, mesh_settings

from doorman.auth import hash_api_key
from doorman.config import PrivacyConfig, SafetyConfig, TenantConfig
from slm.v1 import inference_pb2, inference_pb2_grpc, ledger_pb2, ledger_pb2_grpc

pytestmark = pytest.mark.e2e

PII_KEY = "sk-e2e-pii"
TINY_KEY = "sk-e2e-tiny"
EMAIL = "jane.doe@example.com"
CARD = "4111 1111 1111 1111"
# Repetition makes a greedy model copy the line, so its output shows what it was given.
LINE = "Contact {email}, card {card}."
PROMPT = "Copy each line exactly.\n" + "Line: {line}\nCopy: {line}\n" * 2 + "Line: {line}\nCopy:"


def prompt(email: str, card: str) -> str:
    return PROMPT.format(line=LINE.format(email=email, card=card))


@pytest.fixture(scope="module")
def policy_mesh(model_path: object, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    state = tmp_path_factory.mktemp("policy-mesh")
    settings = mesh_settings(state)
    settings.doorman = settings.doorman.model_copy(
        update={
            "tenants": [
                TenantConfig(name="pii", key_hashes=[hash_api_key(PII_KEY)]),
                TenantConfig(name="tiny", key_hashes=[hash_api_key(TINY_KEY)], rpm=1),
            ],
            "privacy": PrivacyConfig(sanitize_tiers=["local"]),
            "safety": SafetyConfig(input_deny=[r"\bforbidden topic\b"]),
        }
    )
    mesh = Mesh(settings, state / "slm.toml", state / "mesh.log")
    mesh.start()
    yield mesh
    while CLIENTS:
        CLIENTS.pop().close()
    assert mesh.stop() == 0, mesh.log_tail()


CLIENTS: list[openai.OpenAI] = []


def client(mesh: Mesh, key: str) -> openai.OpenAI:
    """A client the module fixture closes. No client-side retries: a test must see the first 429."""
    CLIENTS.append(mesh.openai_client(key))
    return CLIENTS[-1]


async def engine_generate(mesh: Mesh, text: str, max_tokens: int) -> tuple[str, int]:
    """inference-local directly: what it makes of exactly this prompt."""
    async with grpc.aio.insecure_channel(mesh.settings.doorman.inference_local) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        request = inference_pb2.GenerateRequest(model=DEFAULT_MODEL, prompt=text)
        request.sampling.temperature = 0
        request.sampling.max_tokens = max_tokens
        responses = [r async for r in stub.Generate(request)]
    return "".join(r.delta.text for r in responses[:-1]), responses[-1].end.usage.prompt_tokens


async def test_personal_data_reaches_the_engine_only_as_placeholders(policy_mesh: Mesh) -> None:
    reply = client(policy_mesh, PII_KEY).completions.create(
        model=DEFAULT_MODEL, prompt=prompt(EMAIL, CARD), temperature=0, max_tokens=24
    )
    text = reply.choices[0].text
    assert reply.usage is not None
    # The engine, asked directly with the placeholder prompt, echoes the placeholders; the
    # client got exactly that text with the values put back.
    masked = prompt("<EMAIL_ADDRESS_1>", "<CREDIT_CARD_1>")
    engine_text, engine_prompt_tokens = await engine_generate(policy_mesh, masked, 24)
    assert "<EMAIL_ADDRESS_1>" in engine_text
    assert "<CREDIT_CARD_1>" in engine_text
    restored = engine_text.replace("<EMAIL_ADDRESS_1>", EMAIL).replace("<CREDIT_CARD_1>", CARD)
    assert text == restored
    assert EMAIL in text
    assert CARD in text
    # What the engine counted for the mesh's request is the placeholder prompt, not the raw one.
    _, raw_prompt_tokens = await engine_generate(policy_mesh, prompt(EMAIL, CARD), 1)
    assert reply.usage.prompt_tokens == engine_prompt_tokens
    assert raw_prompt_tokens != engine_prompt_tokens
    # The ledger has counts by type, never the values.
    async with grpc.aio.insecure_channel(policy_mesh.settings.doorman.ledger) as channel:
        records = await ledger_pb2_grpc.LedgerServiceStub(channel).List(ledger_pb2.ListRequest())
    entry = records.records[-1].entry
    assert entry.tenant == "pii"
    assert dict(entry.entity_counts) == {"EMAIL_ADDRESS": 1, "CREDIT_CARD": 1}
    assert EMAIL not in str(records)
    # The card in any spelling, but not its first digits alone: those can occur in a timestamp.
    for value in (CARD, CARD.replace(" ", ""), "1111 1111"):
        assert value not in str(records)


def test_chat_stream_comes_back_restored(policy_mesh: Mesh) -> None:
    stream = client(policy_mesh, PII_KEY).chat.completions.create(
        model=DEFAULT_MODEL,
        messages=[{"role": "user", "content": f"Repeat after me: {EMAIL}"}],
        temperature=0,
        max_tokens=24,
        stream=True,
    )
    chunks = [c for c in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert len([f for f in finishes if f]) == 1
    # The request's own placeholder never reaches the client; one the model made up (a
    # different number) is not ours and passes through as it is.
    assert "<EMAIL_ADDRESS_1>" not in text


def test_rate_limit_is_429_with_retry_after(policy_mesh: Mesh) -> None:
    tiny = client(policy_mesh, TINY_KEY)
    tiny.completions.create(model=DEFAULT_MODEL, prompt="Hi", max_tokens=1)
    with pytest.raises(openai.RateLimitError) as caught:
        tiny.completions.create(model=DEFAULT_MODEL, prompt="Hi", max_tokens=1)
    assert int(caught.value.response.headers["retry-after"]) >= 1
    # Other tenants are not affected.
    client(policy_mesh, PII_KEY).completions.create(model=DEFAULT_MODEL, prompt="Hi", max_tokens=1)


def test_missing_key_is_401_and_denied_input_is_400(policy_mesh: Mesh) -> None:
    with pytest.raises(openai.AuthenticationError):
        client(policy_mesh, "sk-wrong").completions.create(
            model=DEFAULT_MODEL, prompt="Hi", max_tokens=1
        )
    with pytest.raises(openai.BadRequestError) as caught:
        client(policy_mesh, PII_KEY).chat.completions.create(
            model=DEFAULT_MODEL,
            messages=[{"role": "user", "content": "Tell me about the Forbidden Topic."}],
            max_tokens=4,
        )
    assert "safety filter" in str(caught.value)
