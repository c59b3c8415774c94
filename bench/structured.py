"""Constrained decoding's cost: tokens/s with a json_schema constraint against the same streams
unconstrained, and the time to a schema's first token mask.

The Engine runs in this process on the default model with slots for every stream. Each level
(1 and 16 concurrent streams by default) runs the same prompts with the same max_tokens twice,
free and with a ten-field schema of long strings (so that the constrained run is mostly tokens
inside strings, as real structured output is, rather than an early EOS); rounds alternate the
order and the median round is kept. Throughput is completion tokens over the level's wall time.

The first mask: compiling a ten-field schema not seen before (llguidance, vocabulary already
built) plus computing its first token mask, the median of --masks fresh schemas. The one-off
vocabulary setup (once per loaded model) is reported beside it.

    .venv/bin/python bench/structured.py
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
# Imported by name (see gpu_engine.py): mypy on this file alone does not follow into them.
batching: Any = importlib.import_module("batching")
helpers: Any = importlib.import_module("helpers")

RESULTS = Path(__file__).parent / "results"
MODEL = "gemma-3-270m"

TOPICS = [
    "a lighthouse keeper", "a bakery in Lyon", "a jazz trumpeter", "a mountain rescue team",
    "a Roman aqueduct", "a deep-sea research vessel", "a chess tournament", "a city library",
    "a vineyard in Chile", "a robotics startup", "a medieval castle", "a coral reef survey",
    "a night train to Vienna", "a volunteer fire brigade", "a botanical garden", "a comet",
]  # fmt: skip


def ten_field_schema(tag: str = "") -> dict[str, Any]:
    """Ten required fields, most of them long strings; `tag` makes the text (not the
    language) differ, so that a compile cannot come from the cache."""
    text = {"type": "string", "minLength": 40, "maxLength": 400}
    properties: dict[str, Any] = {
        "title": {"type": "string", "minLength": 5, "maxLength": 80},
        "summary": text,
        "history": text,
        "people": text,
        "place": text,
        "mood": {"type": "string", "enum": ["calm", "busy", "tense", "joyful"]},
        "year": {"type": "integer", "minimum": 1000, "maximum": 2100},
        "details": text,
        "outlook": text,
        "rating": {"type": "number", "minimum": 0, "maximum": 10},
    }
    schema = {
        "type": "object",
        "properties": properties,
        "required": list(properties),
        "additionalProperties": False,
    }
    if tag:
        schema["description"] = tag
    return schema


def constraint(schema: dict[str, Any]) -> Any:
    from inference_local.constraints import from_proto  # type: ignore[import-not-found, unused-ignore]
    from slm.v1 import types_pb2 as pb  # type: ignore[import-not-found, unused-ignore]

    return from_proto(
        pb.OutputConstraint(json_schema=pb.JsonSchemaConstraint(schema=json.dumps(schema)))
    )


async def level(
    engine: Any, streams: int, max_tokens: int, constrained: bool, run: int
) -> dict[str, float]:
    from inference_local.engine import End, Request  # type: ignore[import-not-found, unused-ignore]
    from inference_local.sampling import Sampling  # type: ignore[import-not-found, unused-ignore]

    c = constraint(ten_field_schema()) if constrained else None

    async def one(i: int) -> tuple[int, str]:
        request = Request(
            MODEL,
            Sampling(max_tokens=max_tokens, temperature=0.8, seed=1000 * run + i),
            prompt=f"A detailed record, as JSON, of {TOPICS[i % len(TOPICS)]}:\n",
            constraint=c,
        )
        async for event in engine.generate(request):
            if isinstance(event, End):
                return event.completion_tokens, event.finish.value
        raise RuntimeError("no End")

    started = time.perf_counter()
    ends = await asyncio.gather(*(one(i) for i in range(streams)))
    elapsed = time.perf_counter() - started
    tokens = sum(n for n, _ in ends)
    return {
        "tokens": tokens,
        "seconds": elapsed,
        "tokens_per_s": tokens / elapsed,
        "stopped": sum(1 for _, finish in ends if finish == "stop"),
    }


def first_masks(model_path: Path, count: int) -> dict[str, float]:
    """Vocabulary setup once, then compile + first mask of `count` schemas never seen."""
    from inference_local.constraints import Grammars  # type: ignore[import-not-found, unused-ignore]
    from inference_local.llama_api import Model  # type: ignore[import-not-found, unused-ignore]

    model = Model(model_path, vocab_only=True)
    try:
        grammars = Grammars(model)
        started = time.perf_counter()
        grammars.tokenizer()
        setup = time.perf_counter() - started
        compiles, masks, totals = [], [], []
        for i in range(count):
            c = constraint(ten_field_schema(f"run {i}"))
            started = time.perf_counter()
            grammar = grammars.compile(c)
            compiled = time.perf_counter()
            guide = grammar.start()
            rows = grammars.new_masks(1)
            grammars.fill([guide], rows)
            done = time.perf_counter()
            compiles.append(compiled - started)
            masks.append(done - compiled)
            totals.append(done - started)
        return {
            "vocabulary_setup_s": setup,
            "compile_ms_p50": statistics.median(compiles) * 1e3,
            "mask_ms_p50": statistics.median(masks) * 1e3,
            "first_mask_ms_p50": statistics.median(totals) * 1e3,
            "first_mask_ms_max": max(totals) * 1e3,
        }
    finally:
        model.close()


async def run_all(args: argparse.Namespace) -> dict[str, Any]:
    from inference_local.config import InferenceLocalConfig, ModelConfig  # type: ignore[import-not-found, unused-ignore]

    model_path = Path(args.model) if args.model else helpers.default_model_file()
    results: dict[str, Any] = {"first_mask": first_masks(model_path, args.masks), "levels": {}}
    base = InferenceLocalConfig(models_dir=model_path.parent)
    entry = base.models[0]
    slots = max(args.streams)
    ctx = args.max_tokens + 64
    models = [
        ModelConfig(
            **{
                **entry.model_dump(),
                "path": model_path.name,
                "parallel": slots,
                "context_length": ctx,
            }
        )
    ]
    config = base.model_copy(update={"models": models})
    async with batching.direct_engine(config) as engine:
        await level(engine, 1, 8, True, -1)  # load, and build the vocabulary once
        for streams in args.streams:
            rounds: dict[str, list[dict[str, float]]] = {"free": [], "json_schema": []}
            for run in range(args.repeat):
                order = ["free", "json_schema"] if run % 2 == 0 else ["json_schema", "free"]
                for mode in order:
                    result = await level(
                        engine, streams, args.max_tokens, mode == "json_schema", run
                    )
                    rounds[mode].append(result)
                    print(f"  {streams:>2} streams, {mode:<11} round {run}: "
                          f"{result['tokens_per_s']:7.1f} tok/s ({result['tokens']} tokens)",
                          flush=True)  # fmt: skip
            summary: dict[str, Any] = {}
            for mode, runs in rounds.items():
                speeds = [r["tokens_per_s"] for r in runs]
                summary[mode] = {
                    "tokens_per_s": statistics.median(speeds),
                    "runs_tokens_per_s": speeds,
                    "tokens": [r["tokens"] for r in runs],
                    "stopped": [r["stopped"] for r in runs],
                }
            pairs = zip(
                summary["json_schema"]["runs_tokens_per_s"],
                summary["free"]["runs_tokens_per_s"],
                strict=True,
            )
            summary["ratio"] = statistics.median(a / b for a, b in pairs)
            results["levels"][str(streams)] = summary
    results["config"] = {
        "model": str(model_path),
        "max_tokens": args.max_tokens,
        "repeat": args.repeat,
        "slots": slots,
    }
    return results


def report(results: dict[str, Any]) -> None:
    mask = results["first_mask"]
    print(f"\nvocabulary setup (once per model): {mask['vocabulary_setup_s']:.2f} s")
    print(
        f"ten-field schema: compile {mask['compile_ms_p50']:.2f} ms + first mask "
        f"{mask['mask_ms_p50']:.2f} ms = {mask['first_mask_ms_p50']:.2f} ms (p50; max "
        f"{mask['first_mask_ms_max']:.2f} ms; goal < 5 ms)"
    )
    print(f"\n{'streams':>7} {'free tok/s':>11} {'json tok/s':>11} {'ratio':>7}  goal")
    for streams, summary in results["levels"].items():
        goal = ">= 0.95" if streams == "16" else ""
        print(
            f"{streams:>7} {summary['free']['tokens_per_s']:>11.1f} "
            f"{summary['json_schema']['tokens_per_s']:>11.1f} {summary['ratio']:>7.3f}  {goal}"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="a GGUF (default: the bundled default model)")
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--max-tokens", type=int, default=192)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--masks", type=int, default=20)
    parser.add_argument("--out", type=Path, default=RESULTS / "structured.json")
    args = parser.parse_args()
    results = asyncio.run(run_all(args))
    report(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
