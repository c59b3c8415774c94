"""Constrained decoding and n choices inside the continuous-batching scheduler, on the real
default model: outputs that satisfy their constraint, free sequences that a constrained one
beside them does not change, lazy triggers, and siblings that share one prefill."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped,unused-ignore]
import pytest

from inference_local.constraints import Constraint, from_proto, json_schema_lark
from inference_local.llama_api import Context, ContextParams, Model
from inference_local.sampling import Sampling
from inference_local.scheduler import (
    Delta,
    End,
    Finish,
    Scheduler,
    SchedulerConfig,
    SchedulerMetrics,
    SeqRequest,
)
from slm.errors import InvalidArgument
from slm.v1 import types_pb2 as pb

SLOTS = 4

PERSON: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "colour": {"type": "string", "enum": ["red", "green", "blue"]},
        "pets": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3},
    },
    "required": ["name", "age", "colour", "pets"],
    "additionalProperties": False,
}


@dataclass
class Result:
    texts: dict[int, str]
    ends: dict[int, End]
    deltas: list[Delta]


@pytest.fixture(scope="module")
def model(model_path: Path) -> Iterator[Model]:
    model = Model(model_path)
    yield model
    model.close()


@pytest.fixture(scope="module")
async def scheduler(model: Model) -> AsyncIterator[Scheduler]:
    context = Context(model, ContextParams(n_seq=SLOTS, n_ctx_per_seq=256, n_batch=256))
    scheduler = Scheduler(
        # Batch-invariant (plain weights, one thread, a prompt read alone): a sequence's
        # text does not depend on the batch around it, which the tests below compare.
        SchedulerConfig(
            "gemma", SLOTS, 64, 64, 256, sample_threads=2, max_n=3, batch_prompts=False
        ),
        model,
        context,
        SchedulerMetrics(),
        asyncio.get_running_loop(),
    )
    yield scheduler
    await asyncio.to_thread(scheduler.close)
    context.close()


async def run(scheduler: Scheduler, request: SeqRequest) -> Result:
    result = Result({}, {}, [])
    async for event in scheduler.generate(request):
        if isinstance(event, Delta):
            result.texts[event.index] = result.texts.get(event.index, "") + event.text
            result.deltas.append(event)
        else:
            assert event.index not in result.ends
            result.ends[event.index] = event
    assert sorted(result.ends) == list(range(request.n))
    return result


def request(
    model: Model,
    prompt: str,
    seed: int,
    constraint: Constraint | None = None,
    *,
    max_tokens: int = 48,
    **kw: Any,
) -> SeqRequest:
    return SeqRequest(
        prompt=model.tokenize(prompt, add_special=True),
        sampling=Sampling(max_tokens=max_tokens, temperature=0.8, seed=seed),
        constraint=constraint,
        **kw,
    )


def person() -> Constraint:
    constraint = from_proto(
        pb.OutputConstraint(json_schema=pb.JsonSchemaConstraint(schema=json.dumps(PERSON)))
    )
    assert constraint is not None
    return constraint


async def test_json_schema_output_validates_for_20_seeds(
    model: Model, scheduler: Scheduler
) -> None:
    results = await asyncio.gather(
        *(
            run(scheduler, request(model, "A person, as JSON:", seed, person(), max_tokens=64))
            for seed in range(20)
        )
    )
    texts = set()
    for result in results:
        # Every string and number is bounded, so every output fits in 64 tokens.
        assert result.ends[0].finish is Finish.STOP, result.texts
        jsonschema.validate(json.loads(result.texts[0]), PERSON)
        texts.add(result.texts[0])
    assert len(texts) > 10  # the seeds were sampled, not forced down one path


async def test_regex_and_choice_outputs_match(model: Model, scheduler: Scheduler) -> None:
    regex = from_proto(pb.OutputConstraint(regex=r"[A-Z][a-z]{2,8} [0-9]{2}"))
    choices = ["yes", "no", "perhaps not"]
    choice = from_proto(pb.OutputConstraint(choice=pb.ChoiceConstraint(choices=choices)))
    for seed in range(4):
        matched = await run(scheduler, request(model, "Name and age:", seed, regex))
        assert re.fullmatch(r"[A-Z][a-z]{2,8} [0-9]{2}", matched.texts[0])
        assert matched.ends[0].finish is Finish.STOP
        chosen = await run(scheduler, request(model, "Is the sky green?", seed, choice))
        assert chosen.texts[0] in choices
        assert chosen.ends[0].finish is Finish.STOP


async def test_a_complete_grammar_stops_without_sampling_an_end_token(
    model: Model, scheduler: Scheduler
) -> None:
    choice = from_proto(pb.OutputConstraint(choice=pb.ChoiceConstraint(choices=["ok"])))
    req = request(model, "Say ok:", 1, choice, max_tokens=40)
    req.sampling = Sampling(max_tokens=40, temperature=0.8, seed=1, logprobs=True)
    result = await run(scheduler, req)
    assert result.texts[0] == "ok"
    assert result.ends[0].finish is Finish.STOP
    logprobs = [lp for d in result.deltas for lp in d.logprobs]
    # One entry per sampled token, each a piece of "ok": no end-of-turn token was sampled.
    assert len(logprobs) == result.ends[0].completion_tokens
    assert "".join(lp.token for lp in logprobs) == "ok"


async def test_max_tokens_still_ends_a_constrained_sequence(
    model: Model, scheduler: Scheduler
) -> None:
    result = await run(scheduler, request(model, "A person, as JSON:", 3, person(), max_tokens=4))
    assert result.ends[0].finish is Finish.LENGTH
    assert result.ends[0].completion_tokens == 4
    assert result.texts[0].startswith('{"name":"')


async def test_stop_strings_do_not_cut_a_constrained_output(
    model: Model, scheduler: Scheduler
) -> None:
    req = request(model, "A person, as JSON:", 5, person(), max_tokens=64)
    req.sampling = Sampling(max_tokens=64, temperature=0.8, seed=5, stop=('"',))
    result = await run(scheduler, req)
    assert result.ends[0].finish is Finish.STOP
    jsonschema.validate(json.loads(result.texts[0]), PERSON)


async def test_free_sequences_beside_constrained_ones_are_unchanged(
    model: Model, scheduler: Scheduler
) -> None:
    prompt = "Once upon a time, in a small village by the sea,"
    alone = await run(scheduler, request(model, prompt, 7))
    constrained_alone = await run(scheduler, request(model, "A person, as JSON:", 8, person()))
    batched = await asyncio.gather(
        run(scheduler, request(model, "A person, as JSON:", 8, person())),
        run(scheduler, request(model, prompt, 7)),
        run(scheduler, request(model, "Name and age:", 9, person())),
        run(scheduler, request(model, prompt, 10)),
    )
    assert batched[1].texts == alone.texts
    assert batched[0].texts == constrained_alone.texts
    assert batched[3].texts != alone.texts


async def test_lazy_constraint_starts_at_its_trigger(model: Model, scheduler: Scheduler) -> None:
    schema = {
        "type": "object",
        "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}},
        "required": ["n"],
        "additionalProperties": False,
    }
    prompt = model.tokenize("Call the tool: <call>", add_special=True)
    greedy = Sampling(max_tokens=64, temperature=0.0)
    # Left free, the model repeats the prompt's line again and again.
    free = await run(scheduler, SeqRequest(prompt=prompt, sampling=greedy))
    assert free.texts[0].startswith("\n\nCall the tool: <call>\n")
    lazy = Constraint(json_schema_lark(schema), "tool_calls", trigger="<call>")
    result = await run(scheduler, SeqRequest(prompt=prompt, sampling=greedy, constraint=lazy))
    before, found, constrained = result.texts[0].partition("<call>")
    # The same free text up to and including the trigger, then exactly one object.
    assert before + found == "\n\nCall the tool: <call>"
    jsonschema.validate(json.loads(constrained), schema)
    assert result.ends[0].finish is Finish.STOP


async def test_text_after_a_trigger_inside_a_token_is_read_first(
    model: Model, scheduler: Scheduler
) -> None:
    prompt = model.tokenize("Once upon a time", add_special=True)
    greedy = Sampling(max_tokens=64, temperature=0.0)
    free = await run(scheduler, SeqRequest(prompt=prompt, sampling=greedy))
    assert free.texts[0].startswith(", there was")
    # The trigger " the" ends inside the token " there": its rest, "re", is not a digit, so
    # the sequence stops right there.
    digits = Constraint("start: /[0-9]+/", "tool_calls", trigger=" the")
    result = await run(scheduler, SeqRequest(prompt=prompt, sampling=greedy, constraint=digits))
    assert result.texts[0] == ", there"
    assert result.ends[0].finish is Finish.STOP
    # Where the rest fits the grammar, it is its start.
    words = Constraint('start: "re" /[a-z ]+/ "."', "tool_calls", trigger=" the")
    result = await run(scheduler, SeqRequest(prompt=prompt, sampling=greedy, constraint=words))
    assert re.fullmatch(r", there[a-z ]+\.", result.texts[0]), result.texts[0]
    assert result.ends[0].finish is Finish.STOP


async def test_n_choices_share_one_prefill(model: Model, scheduler: Scheduler) -> None:
    prompt = "Once upon a time, in a small village by the sea,"
    before = scheduler.prompt_tokens_decoded
    req = request(model, prompt, 21, n=3)
    result = await run(scheduler, req)
    assert scheduler.prompt_tokens_decoded - before == len(req.prompt)
    assert len(set(result.texts.values())) == 3
    for end in result.ends.values():
        assert end.prompt_tokens == len(req.prompt)
        assert end.completion_tokens > 0
    # Choice i draws from seed + i: choice 0 is the single choice of the same seed, and
    # choice 1 that of the next seed.
    assert result.texts[0] == (await run(scheduler, request(model, prompt, 21))).texts[0]
    assert result.texts[1] == (await run(scheduler, request(model, prompt, 22))).texts[0]


async def test_n_constrained_choices_each_follow_the_schema(
    model: Model, scheduler: Scheduler
) -> None:
    result = await run(
        scheduler, request(model, "A person, as JSON:", 30, person(), max_tokens=64, n=3)
    )
    for index in range(3):
        assert result.ends[index].finish is Finish.STOP
        jsonschema.validate(json.loads(result.texts[index]), PERSON)


async def test_choices_wait_for_slots_as_one_unit(model: Model, scheduler: Scheduler) -> None:
    prompt = "The three primary colours are"
    results = await asyncio.gather(
        run(scheduler, request(model, prompt, 40, n=3)),
        run(scheduler, request(model, prompt, 41, n=3)),
        run(scheduler, request(model, prompt, 42)),
    )
    assert [len(r.ends) for r in results] == [3, 3, 1]
    assert results[0].texts[1] == results[1].texts[0]  # seed 40 + 1 == seed 41


async def test_bad_n_and_uncompilable_constraints_are_refused_before_queueing(
    model: Model, scheduler: Scheduler
) -> None:
    for n in (0, 4):
        with pytest.raises(InvalidArgument, match="n must be") as caught:
            await run(scheduler, request(model, "Hi", 1, n=n))
        assert caught.value.field == "sampling.n"
    bad = from_proto(pb.OutputConstraint(regex="(unclosed"))
    with pytest.raises(InvalidArgument, match="cannot be compiled") as refused:
        await run(scheduler, request(model, "Hi", 1, bad))
    assert refused.value.field == "sampling.constraint.regex"
    assert scheduler.busy == 0
