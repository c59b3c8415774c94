"""Backend sampling in the scheduler, forced on over the CPU build with the real default model:
sampler chains that run inside the decode graph give the host's greedy text, keep same-seed
determinism alone and batched, and hand the rows they cannot sample (a constraint, logprobs,
siblings of one prompt) back to the host within the same batch."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped,unused-ignore]
import pytest

from inference_local.constraints import Constraint, from_proto
from inference_local.llama_api import Context, ContextParams, Model
from inference_local.sampling import Sampling, TokenLogprob
from inference_local.scheduler import (
    Delta,
    End,
    Scheduler,
    SchedulerConfig,
    SchedulerMetrics,
    SeqRequest,
)
from slm.v1 import types_pb2 as pb

SLOTS = 4
PROMPT = "Once upon a time, in a small village by the sea,"
PERSON: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}


@dataclass
class Result:
    texts: dict[int, str]
    ends: dict[int, End]
    logprobs: list[TokenLogprob]


class Moves(SchedulerMetrics):
    def __init__(self) -> None:
        self.moves = 0

    def moved(self) -> None:
        self.moves += 1


@pytest.fixture(scope="module")
def model(model_path: Path) -> Iterator[Model]:
    model = Model(model_path)
    yield model
    model.close()


async def open_scheduler(model: Model, backend: bool) -> tuple[Scheduler, Context, Moves]:
    context = Context(
        model,
        ContextParams(n_seq=SLOTS, n_ctx_per_seq=256, n_batch=256, backend_sampling=backend),
    )
    metrics = Moves()
    scheduler = Scheduler(
        # Batch-invariant (plain weights, one thread, a prompt read alone): the tests below
        # compare a sequence's text alone and batched.
        SchedulerConfig(
            f"gemma-{backend}", SLOTS, 64, 64, 256, sample_threads=2, max_n=3, batch_prompts=False
        ),
        model,
        context,
        metrics,
        asyncio.get_running_loop(),
    )
    return scheduler, context, metrics


@pytest.fixture(scope="module")
async def device(model: Model) -> AsyncIterator[tuple[Scheduler, Moves]]:
    """A scheduler whose context samples in the decode graph (on the CPU here)."""
    scheduler, context, metrics = await open_scheduler(model, True)
    assert context.backend_sampling
    yield scheduler, metrics
    await asyncio.to_thread(scheduler.close)
    context.close()


@pytest.fixture(scope="module")
async def host(model: Model) -> AsyncIterator[Scheduler]:
    scheduler, context, _ = await open_scheduler(model, False)
    assert not context.backend_sampling
    yield scheduler
    await asyncio.to_thread(scheduler.close)
    context.close()


async def run(scheduler: Scheduler, request: SeqRequest) -> Result:
    result = Result({}, {}, [])
    async for event in scheduler.generate(request):
        if isinstance(event, Delta):
            result.texts[event.index] = result.texts.get(event.index, "") + event.text
            result.logprobs.extend(event.logprobs)
        else:
            result.ends[event.index] = event
    assert sorted(result.ends) == list(range(request.n))
    return result


def request(
    model: Model,
    seed: int,
    *,
    prompt: str = PROMPT,
    constraint: Constraint | None = None,
    n: int = 1,
    **sampling: Any,
) -> SeqRequest:
    fields: dict[str, Any] = {"max_tokens": 32, "temperature": 0.8, "seed": seed, **sampling}
    return SeqRequest(
        prompt=model.tokenize(prompt, add_special=True),
        sampling=Sampling(**fields),
        constraint=constraint,
        n=n,
    )


def person() -> Constraint:
    constraint = from_proto(
        pb.OutputConstraint(json_schema=pb.JsonSchemaConstraint(schema=json.dumps(PERSON)))
    )
    assert constraint is not None
    return constraint


def test_the_default_is_the_graph_only_for_one_slot_on_a_gpu(model: Model) -> None:
    for slots, expected in ((1, model.output_on_gpu), (2, False)):
        context = Context(model, ContextParams(n_seq=slots, n_ctx_per_seq=64))
        try:
            assert context.backend_sampling is expected
        finally:
            context.close()


async def test_greedy_text_is_the_hosts(
    model: Model, device: tuple[Scheduler, Moves], host: Scheduler
) -> None:
    scheduler, _ = device
    prompts = [PROMPT, "The three largest cities of France are", "def fibonacci(n):"]
    before = scheduler.tokens_sampled_on_device
    on_device = await asyncio.gather(
        *(run(scheduler, request(model, 1, prompt=p, temperature=0.0)) for p in prompts)
    )
    on_host = await asyncio.gather(
        *(run(host, request(model, 1, prompt=p, temperature=0.0)) for p in prompts)
    )
    assert [r.texts for r in on_device] == [r.texts for r in on_host]
    generated = sum(r.ends[0].completion_tokens for r in on_device)
    # Every token, the first of each prompt included, was sampled in the graph.
    assert scheduler.tokens_sampled_on_device - before == generated
    assert host.tokens_sampled_on_device == 0


async def test_same_seed_same_text_alone_and_batched(
    model: Model, device: tuple[Scheduler, Moves]
) -> None:
    scheduler, _ = device
    penalised: dict[str, Any] = {
        "repetition_penalty": 1.3,
        "presence_penalty": 0.5,
        "logit_bias": {1: -100.0},
    }
    alone = [
        await run(scheduler, request(model, 7)),
        await run(scheduler, request(model, 8, **penalised)),
        await run(scheduler, request(model, 9, top_k=0, top_p=0.9, min_p=0.0)),
        await run(scheduler, request(model, 10, n=2)),
    ]
    batched = await asyncio.gather(
        run(scheduler, request(model, 10, n=2)),
        run(scheduler, request(model, 9, top_k=0, top_p=0.9, min_p=0.0)),
        run(scheduler, request(model, 8, **penalised)),
        run(scheduler, request(model, 7)),
    )
    assert [r.texts for r in batched[::-1]] == [r.texts for r in alone]
    # The seeds were sampled: choices and seeds differ.
    assert len({alone[0].texts[0], alone[3].texts[0], alone[3].texts[1]}) == 3


async def test_a_constrained_sequence_beside_device_ones_samples_on_the_host(
    model: Model, device: tuple[Scheduler, Moves]
) -> None:
    scheduler, _ = device
    free_alone = await run(scheduler, request(model, 3))
    constrained_alone = await run(
        scheduler, request(model, 4, prompt="A person, as JSON:", constraint=person())
    )
    before = scheduler.tokens_sampled_on_device
    constrained, free, other = await asyncio.gather(
        run(scheduler, request(model, 4, prompt="A person, as JSON:", constraint=person())),
        run(scheduler, request(model, 3)),
        run(scheduler, request(model, 5, prompt="The sea")),
    )
    jsonschema.validate(json.loads(constrained.texts[0]), PERSON)
    assert constrained.texts == constrained_alone.texts
    assert free.texts == free_alone.texts
    # Exactly the free sequences' tokens came from the graph.
    on_device = free.ends[0].completion_tokens + other.ends[0].completion_tokens
    assert scheduler.tokens_sampled_on_device - before == on_device


async def test_logprobs_come_from_the_host_rows(
    model: Model, device: tuple[Scheduler, Moves], host: Scheduler
) -> None:
    scheduler, _ = device
    before = scheduler.tokens_sampled_on_device
    on_device, free = await asyncio.gather(
        run(scheduler, request(model, 1, temperature=0.0, logprobs=True, top_logprobs=3)),
        run(scheduler, request(model, 2)),
    )
    on_host = await run(host, request(model, 1, temperature=0.0, logprobs=True, top_logprobs=3))
    assert on_device.texts == on_host.texts
    assert len(on_device.logprobs) == on_device.ends[0].completion_tokens
    assert on_device.logprobs == on_host.logprobs
    assert scheduler.tokens_sampled_on_device - before == free.ends[0].completion_tokens


async def test_a_sequence_moved_to_another_slot_keeps_its_chain(
    model: Model, device: tuple[Scheduler, Moves]
) -> None:
    scheduler, metrics = device
    alone = await run(scheduler, request(model, 11, repetition_penalty=1.2))
    moves = metrics.moves
    # The short one ends first and frees slot 0: the long one moves down into it, where the
    # short one's chain is still attached.
    short, moved = await asyncio.gather(
        run(scheduler, request(model, 12, max_tokens=3)),
        run(scheduler, request(model, 11, repetition_penalty=1.2)),
    )
    assert metrics.moves > moves
    assert short.ends[0].completion_tokens == 3
    assert moved.texts == alone.texts
