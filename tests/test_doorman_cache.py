"""The Doorman's result cache: the cache class with a fake clock, then a real Doorman over the
real engine (in-process, port 0), the gateway's Cache-Control header, and Redis."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import grpc
import httpx
import pytest
from helpers import DEFAULT_MODEL, free_port, gateway_settings
from pydantic import ValidationError
from test_doorman_routing import address, doorman_for, ledger_entries, routed_settings

from doorman.auth import hash_api_key
from doorman.cache import (
    MemoryResults,
    RedisResults,
    ResultCache,
    cache_key,
    cacheable,
    decode,
    deterministic,
    encode,
)
from doorman.config import (
    CacheConfig,
    PrivacyConfig,
    RoutingConfig,
    SafetyConfig,
    TenantConfig,
)
from gateway.app import build_app
from mesh.settings import Settings
from slm.server import GrpcService
from slm.v1 import (
    doorman_pb2,
    doorman_pb2_grpc,
    inference_pb2,
    ledger_pb2,
    ledger_pb2_grpc,
    types_pb2,
)

# --- the cache class ----------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def answer(
    text: str, reason: types_pb2.FinishReason.ValueType = types_pb2.FINISH_REASON_STOP
) -> list[bytes]:
    events = [
        inference_pb2.GenerateResponse(delta=types_pb2.TextDelta(text=text)),
        inference_pb2.GenerateResponse(
            end=types_pb2.StreamEnd(finish_reason=reason, usage=types_pb2.Usage(total_tokens=1))
        ),
    ]
    return [event.SerializeToString() for event in events]


async def test_memory_entries_expire_after_their_ttl() -> None:
    clock = Clock()
    store = MemoryResults(ttl_s=10, max_entries=10, max_bytes=10_000, clock=clock)
    await store.put("k", b"answer")
    clock.now += 9.999
    assert await store.get("k") == b"answer"
    clock.now += 0.001
    assert await store.get("k") is None
    assert (len(store), store.size_bytes) == (0, 0)


async def test_memory_entries_beyond_the_bounds_go_least_recently_used_first() -> None:
    store = MemoryResults(ttl_s=60, max_entries=2, max_bytes=10, clock=Clock())
    await store.put("a", b"1111")
    await store.put("b", b"2222")
    assert await store.get("a") == b"1111"  # now "b" is the least recently used
    await store.put("c", b"3333")
    assert (await store.get("a"), await store.get("b"), await store.get("c")) == (
        b"1111",
        None,
        b"3333",
    )
    # Bytes bound the cache too: 4 + 4 + 4 > 10, so the oldest goes.
    await store.put("d", b"4444")
    assert await store.get("a") is None
    assert (len(store), store.size_bytes) == (2, 8)
    # One entry larger than the whole cache is not kept, and evicts nothing.
    await store.put("huge", b"x" * 11)
    assert (await store.get("huge"), len(store)) == (None, 2)
    # Replacing an entry counts its bytes once.
    await store.put("d", b"44")
    assert store.size_bytes == 6


async def test_answers_round_trip_and_large_ones_are_not_kept() -> None:
    cache = ResultCache(MemoryResults(60, 10, 10_000), max_entry_bytes=64)
    assert await cache.put("k", answer("hello"))
    found = await cache.get(["missing", "k"])
    assert found is not None
    key, events = found
    assert key == "k"
    assert [e.delta.text for e in events[:-1]] == ["hello"]
    assert events[-1].end.finish_reason == types_pb2.FINISH_REASON_STOP
    # Each read gives fresh messages: the output path rewrites them in place.
    events[0].delta.text = "changed"
    again = await cache.get(["k"])
    assert again is not None
    assert again[1][0].delta.text == "hello"
    assert not await cache.put("big", answer("x" * 100))
    assert await cache.get(["big"]) is None


def test_unreadable_entries_are_misses() -> None:
    assert decode(b"") is None
    assert decode(b"\x02" + encode(answer("a"))[1:]) is None
    assert decode(encode(answer("a"))[:-3]) is None
    # An answer without its end is never one.
    assert decode(encode(answer("a")[:1])) is None


def test_only_greedy_or_seeded_sampling_is_deterministic() -> None:
    assert deterministic(types_pb2.SamplingParams(temperature=0))
    assert deterministic(types_pb2.SamplingParams(temperature=0.8, seed=0))
    assert deterministic(types_pb2.SamplingParams(seed=7, n=3))
    assert not deterministic(types_pb2.SamplingParams())  # the default temperature is 0.8
    assert not deterministic(types_pb2.SamplingParams(temperature=0.2))


def test_only_answers_that_ended_on_their_own_are_cacheable() -> None:
    def end(reason: str) -> types_pb2.StreamEnd:
        return types_pb2.StreamEnd(
            finish_reason=types_pb2.FinishReason.Value(f"FINISH_REASON_{reason}")
        )

    assert all(cacheable(end(reason)) for reason in ("STOP", "LENGTH", "TOOL_CALLS"))
    assert not any(
        cacheable(end(reason)) for reason in ("CANCELLED", "CONTENT_FILTER", "UNSPECIFIED")
    )
    # Every choice must have ended so.
    partial = types_pb2.StreamEnd(
        finish_reason=types_pb2.FINISH_REASON_STOP,
        choices=[
            types_pb2.ChoiceEnd(index=0, finish_reason=types_pb2.FINISH_REASON_STOP),
            types_pb2.ChoiceEnd(index=1, finish_reason=types_pb2.FINISH_REASON_CONTENT_FILTER),
        ],
    )
    assert not cacheable(partial)


def test_keys_differ_by_tenant_and_by_every_parameter() -> None:
    def request(
        max_tokens: int | None = None, top_k: int | None = None
    ) -> inference_pb2.GenerateRequest:
        sampling = types_pb2.SamplingParams(temperature=0, max_tokens=max_tokens, top_k=top_k)
        return inference_pb2.GenerateRequest(model="m", prompt="p", sampling=sampling)

    base = cache_key("a", request())
    assert cache_key("a", request()) == base
    assert cache_key("b", request()) != base
    assert cache_key("a", request(max_tokens=5)) != base
    assert cache_key("a", request(top_k=1)) != base
    with_bias = request()
    with_bias.sampling.logit_bias.update({1: 1.0, 2: -1.0})
    other_order = request()
    other_order.sampling.logit_bias.update({2: -1.0, 1: 1.0})
    # Maps serialise deterministically: the order they were filled in does not matter.
    assert cache_key("a", with_bias) == cache_key("a", other_order) != base
    adapter = request()
    adapter.adapter = "legal"
    assert cache_key("a", adapter) != base


def test_redis_takes_no_memory_bounds() -> None:
    with pytest.raises(ValidationError, match="max_entries"):
        CacheConfig(backend="redis", max_entries=5)
    assert CacheConfig(backend="redis", ttl_s=5).backend == "redis"


# --- a real Doorman over the real engine --------------------------------------------------------

EMAIL = "alice.liddell@example.com"
OTHER_EMAIL = "bob.marley@example.org"
# Repetition makes a greedy model copy the line, so its answer holds the (masked) address.
PROMPT = "Copy each line exactly.\n" + "Line: Write to {e}.\nCopy: Write to {e}.\n" * 2
PROMPT += "Line: Write to {e}.\nCopy:"


def engine_requests(inference: GrpcService) -> float:
    """Generations the engine has finished, whatever their reason."""
    return float(
        sum(
            sample.value
            for metric in inference.registry.collect()
            if metric.name == "slm_engine_requests"
            for sample in metric.samples
            if sample.name == "slm_engine_requests_total"
        )
    )


def doorman_metric(service: GrpcService, name: str) -> float:
    return service.registry.get_sample_value(name, {"model": DEFAULT_MODEL}) or 0.0


def chat(
    text: str = "Name a colour.",
    max_tokens: int = 8,
    cache: doorman_pb2.CachePolicy.ValueType = doorman_pb2.CACHE_POLICY_UNSPECIFIED,
    temperature: float = 0,
    seed: int | None = None,
    n: int | None = None,
) -> doorman_pb2.ChatRequest:
    sampling = types_pb2.SamplingParams(max_tokens=max_tokens, temperature=temperature, n=n)
    if seed is not None:
        sampling.seed = seed
    return doorman_pb2.ChatRequest(
        model=DEFAULT_MODEL,
        messages=[types_pb2.ChatMessage(role=types_pb2.ROLE_USER, content=text)],
        sampling=sampling,
        cache=cache,
    )


def cached_settings(
    tmp_path: Path, inference: GrpcService, ledger: GrpcService, **doorman: object
) -> Settings:
    settings = routed_settings(tmp_path, ledger, RoutingConfig(), address(inference))
    settings.doorman = settings.doorman.model_copy(update={"cache": CacheConfig(), **doorman})
    return settings


@contextlib.asynccontextmanager
async def cached_doorman(
    tmp_path: Path, inference: GrpcService, ledger: GrpcService, **doorman: object
) -> AsyncIterator[tuple[doorman_pb2_grpc.DoormanServiceStub, GrpcService]]:
    async with doorman_for(cached_settings(tmp_path, inference, ledger, **doorman)) as running:
        yield running


async def events(
    call: grpc.aio.UnaryStreamCall,
) -> list[doorman_pb2.ChatResponse]:
    return [response async for response in call]


Events = Sequence[doorman_pb2.ChatResponse] | Sequence[doorman_pb2.CompleteResponse]


def deltas(responses: Events) -> list[types_pb2.TextDelta]:
    return [r.delta for r in responses if r.HasField("delta")]


def complete(email: str) -> doorman_pb2.CompleteRequest:
    return doorman_pb2.CompleteRequest(
        model=DEFAULT_MODEL,
        prompt=PROMPT.format(e=email),
        sampling=types_pb2.SamplingParams(max_tokens=12, temperature=0),
    )


def text(responses: Events) -> str:
    return "".join(d.text for d in deltas(responses))


async def kept(service: GrpcService) -> None:
    """The answers the Doorman is still writing to its cache, written."""
    await service.app.doorman.drain()  # type: ignore[attr-defined]


async def test_a_repeated_greedy_request_is_answered_from_the_cache(
    inference_server: GrpcService, ledger_server: GrpcService, tmp_path: Path
) -> None:
    async with cached_doorman(tmp_path, inference_server, ledger_server) as (stub, service):
        first = await events(stub.Chat(chat()))
        await kept(service)
        engine_before = engine_requests(inference_server)
        second = await events(stub.Chat(chat()))
        assert engine_requests(inference_server) == engine_before
        # The same stream, chunk for chunk, and the same end (usage included).
        assert deltas(second) == deltas(first)
        assert len(deltas(first)) > 1
        first_end, second_end = first[-1].end, second[-1].end
        assert (second_end.finish_reason, second_end.usage) == (
            first_end.finish_reason,
            first_end.usage,
        )
        assert second_end.model == first_end.model == DEFAULT_MODEL
        # Nothing went upstream: no tier served it.
        assert first_end.tier == types_pb2.TIER_LOCAL
        assert (second_end.tier, second_end.upstream) == (types_pb2.TIER_UNSPECIFIED, "")
        assert (first_end.cache_hit, second_end.cache_hit) == (False, True)
        assert doorman_metric(service, "slm_doorman_cache_hits_total") == 1
        assert doorman_metric(service, "slm_doorman_cache_misses_total") == 1
        entries = await ledger_entries(ledger_server, service)
        async with grpc.aio.insecure_channel(address(ledger_server)) as channel:
            verdict = await ledger_pb2_grpc.LedgerServiceStub(channel).Verify(
                ledger_pb2.VerifyRequest()
            )
    assert [e.cache_hit for e in entries] == [False, True]
    assert entries[1].completion_tokens == entries[0].completion_tokens > 0
    assert entries[1].tier == types_pb2.TIER_UNSPECIFIED
    assert (verdict.intact, verdict.records_checked) == (True, 2)


async def test_a_completion_replays_as_the_same_stream(
    inference_server: GrpcService, ledger_server: GrpcService, tmp_path: Path
) -> None:
    request = doorman_pb2.CompleteRequest(
        model=DEFAULT_MODEL,
        prompt="The three primary colours are",
        sampling=types_pb2.SamplingParams(max_tokens=12, seed=42),
    )
    async with cached_doorman(tmp_path, inference_server, ledger_server) as (stub, service):
        first = [r async for r in stub.Complete(request)]
        await kept(service)
        before = engine_requests(inference_server)
        second = [r async for r in stub.Complete(request)]
        assert engine_requests(inference_server) == before
    assert [r.delta for r in second[:-1]] == [r.delta for r in first[:-1]]
    assert len(first) > 2
    assert second[-1].HasField("end")


async def test_personal_data_is_cached_masked_and_each_caller_gets_its_own_back(
    inference_server: GrpcService, ledger_server: GrpcService, tmp_path: Path
) -> None:
    privacy = PrivacyConfig(sanitize_tiers=["local"])
    async with cached_doorman(tmp_path, inference_server, ledger_server, privacy=privacy) as (
        stub,
        service,
    ):
        alice = [r async for r in stub.Complete(complete(EMAIL))]
        await kept(service)
        before = engine_requests(inference_server)
        # The same request with another address in the same place: its sanitised form is the
        # same, so the cache answers, restored with the second caller's own address.
        bob = [r async for r in stub.Complete(complete(OTHER_EMAIL))]
        assert engine_requests(inference_server) == before
        assert doorman_metric(service, "slm_doorman_cache_hits_total") == 1
        entries = await ledger_entries(ledger_server, service)
    assert EMAIL in text(alice)
    assert OTHER_EMAIL in text(bob)
    assert EMAIL not in text(bob)
    assert text(bob) == text(alice).replace(EMAIL, OTHER_EMAIL)
    assert "<EMAIL_ADDRESS_1>" not in text(bob)
    assert dict(bob[-1].end.masked_entities) == {"EMAIL_ADDRESS": 1}
    assert [e.cache_hit for e in entries] == [False, True]
    assert EMAIL not in str(entries)
    assert OTHER_EMAIL not in str(entries)


async def test_a_replay_passes_the_output_filter_and_is_kept_unfiltered(
    inference_server: GrpcService, ledger_server: GrpcService, tmp_path: Path
) -> None:
    safety = SafetyConfig(output_deny=["[aeiou]"], output_action="redact")
    async with cached_doorman(tmp_path, inference_server, ledger_server, safety=safety) as (
        stub,
        service,
    ):
        first = await events(stub.Chat(chat()))
        await kept(service)
        before = engine_requests(inference_server)
        second = await events(stub.Chat(chat()))
        assert engine_requests(inference_server) == before
        entries = await ledger_entries(ledger_server, service)
    assert "[redacted]" in text(first)
    assert text(second) == text(first)
    assert [list(e.policy_decisions) for e in entries] == [["safety:redacted"]] * 2


async def test_a_route_that_does_not_sanitise_keeps_personal_data_under_its_own_key(
    inference_server: GrpcService, ledger_server: GrpcService, tmp_path: Path
) -> None:
    async with cached_doorman(tmp_path, inference_server, ledger_server) as (stub, service):
        alice = [r async for r in stub.Complete(complete(EMAIL))]
        await kept(service)
        before = engine_requests(inference_server)
        bob = [r async for r in stub.Complete(complete(OTHER_EMAIL))]
        # The upstream saw the plain text: another address is another request.
        assert engine_requests(inference_server) == before + 1
        assert doorman_metric(service, "slm_doorman_cache_hits_total") == 0
    assert EMAIL in text(alice)
    assert EMAIL not in text(bob)


async def test_the_bypass_field_and_cache_control_metadata_go_upstream(
    inference_server: GrpcService, ledger_server: GrpcService, tmp_path: Path
) -> None:
    async with cached_doorman(tmp_path, inference_server, ledger_server) as (stub, service):
        await events(stub.Chat(chat()))
        await kept(service)
        before = engine_requests(inference_server)
        await events(stub.Chat(chat(cache=doorman_pb2.CACHE_POLICY_BYPASS)))
        await events(stub.Chat(chat(), metadata=(("cache-control", "no-cache"),)))
        await events(stub.Chat(chat(), metadata=(("cache-control", "private, No-Store"),)))
        assert engine_requests(inference_server) == before + 3
        # Other directives do not concern this cache.
        await events(stub.Chat(chat(), metadata=(("cache-control", "max-age=60"),)))
        assert engine_requests(inference_server) == before + 3
        assert doorman_metric(service, "slm_doorman_cache_hits_total") == 1
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await events(stub.Chat(chat(cache=7)))  # type: ignore[arg-type]
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "cache" in (refused.value.details() or "")
        entries = await ledger_entries(ledger_server, service)
    assert [e.cache_hit for e in entries] == [False, False, False, False, True]


async def test_sampled_requests_are_never_cached_seeded_ones_are(
    inference_server: GrpcService, ledger_server: GrpcService, tmp_path: Path
) -> None:
    async with cached_doorman(tmp_path, inference_server, ledger_server) as (stub, service):
        before = engine_requests(inference_server)
        for _ in range(2):
            await events(stub.Chat(chat(temperature=0.7)))
            await kept(service)
        assert engine_requests(inference_server) == before + 2
        assert doorman_metric(service, "slm_doorman_cache_misses_total") == 0
        seeded = chat(temperature=0.7, seed=5, n=2)
        first = await events(stub.Chat(seeded))
        await kept(service)
        before = engine_requests(inference_server)
        second = await events(stub.Chat(seeded))
        assert engine_requests(inference_server) == before
    assert deltas(second) == deltas(first)
    assert {d.choice_index for d in deltas(second)} == {0, 1}


async def test_a_cancelled_stream_is_not_kept(
    inference_server: GrpcService, ledger_server: GrpcService, tmp_path: Path
) -> None:
    async with cached_doorman(tmp_path, inference_server, ledger_server) as (stub, service):
        call = stub.Chat(chat(max_tokens=64))
        async for response in call:
            assert response.HasField("delta")
            break
        call.cancel()
        await kept(service)
        await events(stub.Chat(chat(max_tokens=64)))
        assert doorman_metric(service, "slm_doorman_cache_hits_total") == 0
        assert doorman_metric(service, "slm_doorman_cache_misses_total") == 2


TENANT_KEYS = {"red": "red-key-0123456789", "blue": "blue-key-0123456789"}


async def test_tenants_never_share_an_entry(
    inference_server: GrpcService, ledger_server: GrpcService, tmp_path: Path
) -> None:
    tenants = [
        TenantConfig(name=name, key_hashes=[hash_api_key(key)]) for name, key in TENANT_KEYS.items()
    ]
    async with cached_doorman(tmp_path, inference_server, ledger_server, tenants=tenants) as (
        stub,
        service,
    ):

        def as_(tenant: str) -> tuple[tuple[str, str]]:
            return (("authorization", f"Bearer {TENANT_KEYS[tenant]}"),)

        await events(stub.Chat(chat(), metadata=as_("red")))
        await kept(service)
        before = engine_requests(inference_server)
        await events(stub.Chat(chat(), metadata=as_("blue")))
        assert engine_requests(inference_server) == before + 1
        await kept(service)
        await events(stub.Chat(chat(), metadata=as_("red")))
        await events(stub.Chat(chat(), metadata=as_("blue")))
        assert engine_requests(inference_server) == before + 1
        entries = await ledger_entries(ledger_server, service)
    assert [(e.tenant, e.cache_hit) for e in entries] == [
        ("red", False),
        ("blue", False),
        ("red", True),
        ("blue", True),
    ]


async def test_no_cache_header_through_the_gateway(
    inference_server: GrpcService, ledger_server: GrpcService, tmp_path: Path
) -> None:
    async with cached_doorman(tmp_path, inference_server, ledger_server) as (_, service):
        settings = cached_settings(tmp_path, inference_server, ledger_server)
        settings.gateway = settings.gateway.model_copy(update={"doorman": address(service)})
        app = build_app(gateway_settings(settings))
        body = {
            "model": DEFAULT_MODEL,
            "messages": [{"role": "user", "content": "Name a fruit."}],
            "max_tokens": 8,
            "temperature": 0,
        }
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://gateway", timeout=120
            ) as client,
        ):
            url = "/v1/chat/completions"
            first = await client.post(url, json=body)
            await kept(service)
            before = engine_requests(inference_server)
            cached = await client.post(url, json=body)
            assert engine_requests(inference_server) == before
            fresh = await client.post(url, json=body, headers={"Cache-Control": "no-cache"})
            assert engine_requests(inference_server) == before + 1
            streamed = await client.post(url, json=body | {"stream": True})
            assert engine_requests(inference_server) == before + 1
    assert first.status_code == cached.status_code == fresh.status_code == 200
    content = first.json()["choices"][0]["message"]["content"]
    assert content
    assert cached.json()["choices"][0]["message"]["content"] == content
    assert fresh.json()["choices"][0]["message"]["content"] == content
    # The answer says where it came from: the cache, or a tier.
    assert [r.json()["slm"]["cached"] for r in (first, cached, fresh)] == [False, True, False]
    assert (cached.json()["slm"]["tier"], fresh.json()["slm"]["tier"]) == (None, "local")
    assert streamed.status_code == 200
    assert "data: [DONE]" in streamed.text


# --- Redis --------------------------------------------------------------------------------------


async def test_redis_keeps_entries_with_their_ttl(redis_url: str) -> None:
    store = RedisResults(redis_url, ttl_s=30, prefix="slm:test-result:")
    try:
        assert await store.get("k") is None
        await store.put("k", b"answer")
        assert await store.get("k") == b"answer"
        ttl_ms = await store._client.pttl("slm:test-result:k")
        assert 0 < ttl_ms <= 30_000
    finally:
        await store.close()


async def test_replicas_share_answers_through_redis(
    inference_server: GrpcService, ledger_server: GrpcService, tmp_path: Path, redis_url: str
) -> None:
    cache = CacheConfig(backend="redis", redis_url=redis_url)
    # A request no other test sends, so the shared server holds no answer to it yet.
    request = chat(f"Name a colour. ({tmp_path.name})")
    async with cached_doorman(tmp_path, inference_server, ledger_server, cache=cache) as (
        first_stub,
        first,
    ):
        answer_first = await events(first_stub.Chat(request))
        await kept(first)
    async with cached_doorman(tmp_path, inference_server, ledger_server, cache=cache) as (
        second_stub,
        second,
    ):
        before = engine_requests(inference_server)
        answer_second = await events(second_stub.Chat(request))
        assert engine_requests(inference_server) == before
        assert doorman_metric(second, "slm_doorman_cache_hits_total") == 1
    assert deltas(answer_second) == deltas(answer_first)


async def test_redis_down_serves_from_upstream(
    inference_server: GrpcService, ledger_server: GrpcService, tmp_path: Path
) -> None:
    cache = CacheConfig(backend="redis", redis_url=f"redis://127.0.0.1:{free_port()}/0")
    async with cached_doorman(tmp_path, inference_server, ledger_server, cache=cache) as (
        stub,
        service,
    ):
        answered = await events(stub.Chat(chat()))
        await kept(service)
        errors = {
            op: service.registry.get_sample_value(
                "slm_doorman_cache_errors_total", {"operation": op}
            )
            for op in ("get", "put")
        }
    assert answered[-1].end.finish_reason in (
        types_pb2.FINISH_REASON_STOP,
        types_pb2.FINISH_REASON_LENGTH,
    )
    assert errors == {"get": 1, "put": 1}
