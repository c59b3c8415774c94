"""Prompts read one llama_decode each against all of them in one llama_decode.

inference-local's scheduler reads the prompt chunks of a step together in one pass (as
llama-server batches them), except in a batch-invariant replica, where each chunk is its own
pass. This isolates what that choice costs: on inference-local's llama.cpp context with its
defaults (repacked weights, every core, one KV stream a slot), n distinct prompts of --tokens
tokens each are read into consecutive slots, first one decode each ("separate"), then all in
one decode ("together"), alternating for --repeat rounds; the median of each is kept. A pass
holds at most inference-local's n_batch tokens (512 by default), as the scheduler's do.

    .venv/bin/python bench/prompt_passes.py --prompts 2 4 --tokens 128
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "services"))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from helpers import default_model_file

from inference_local.config import InferenceLocalConfig
from inference_local.engine import default_threads
from inference_local.llama_api import Batch, Context, ContextParams, Model

RESULTS = Path(__file__).parent / "results"


def prompts(model: Model, n: int, tokens: int) -> list[list[int]]:
    """n distinct prompts of exactly `tokens` tokens."""
    out = []
    for i in range(n):
        text = " ".join(f"Item {i}.{j}: the tenant pays {j * 7 + i} euros." for j in range(60))
        ids = model.tokenize(text, add_special=True)[:tokens]
        assert len(ids) == tokens, "the text is too short for --tokens"
        out.append(ids)
    return out


def read(context: Context, batch: Batch, runs: list[list[int]], together: bool) -> float:
    """Seconds to read every prompt into its slot (slot i for prompt i), the last row's logits
    computed for each, in one decode or one decode each."""
    for slot in range(len(runs)):
        context.clear_seq(slot)
    started = time.perf_counter()
    batch.clear()
    for slot, ids in enumerate(runs):
        batch.add_many(ids, 0, slot, True)
        if not together:
            context.decode(batch)
            batch.clear()
    if together:
        context.decode(batch)
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--out", type=Path, default=RESULTS / "prompt_passes.json")
    args = parser.parse_args()
    threads = default_threads()
    capacity = InferenceLocalConfig().n_batch
    most = max(args.prompts)
    if most * args.tokens > capacity:
        parser.error(f"{most} prompts of {args.tokens} tokens pass n_batch ({capacity})")
    model = Model(default_model_file(), repack=True)
    context = Context(
        model,
        ContextParams(
            n_seq=most, n_ctx_per_seq=args.tokens + 16, n_batch=capacity, n_threads=threads
        ),
    )
    batch = Batch(capacity)
    results: dict[str, Any] = {
        "threads": threads,
        "tokens": args.tokens,
        "n_batch": capacity,
        "levels": {},
    }
    try:
        read(context, batch, prompts(model, 1, args.tokens), True)  # warm up
        for n in args.prompts:
            runs = prompts(model, n, args.tokens)
            timings: dict[str, list[float]] = {"separate": [], "together": []}
            for round_ in range(args.repeat):
                order = [False, True] if round_ % 2 == 0 else [True, False]
                for one_pass in order:
                    seconds = read(context, batch, runs, one_pass)
                    timings["together" if one_pass else "separate"].append(seconds)
            separate = statistics.median(timings["separate"])
            together = statistics.median(timings["together"])
            results["levels"][str(n)] = {
                "separate_s": separate,
                "together_s": together,
                "ratio": together / separate,
                "runs": timings,
            }
            print(
                f"{n} prompts of {args.tokens} tokens: separate {separate * 1000:.0f} ms, "
                f"together {together * 1000:.0f} ms ({together / separate:.2f}x)",
                flush=True,
            )
    finally:
        batch.close()
        context.close()
        model.close()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"JSON: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
