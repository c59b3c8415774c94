"""The decode step alone: one llama_decode of n sequences, one token each, against llama-server.

bench/batching.py measures whole runs, where prompt passes, sampling and the event loop all
count. This one isolates the kernel work of a full decode step, so a gap there can be told
apart from one in the scheduling:

- engine: inference-local's llama.cpp context on its defaults (repacked weights, flash
  attention as llama.cpp chooses), n prompts read, then --steps steps that each decode one
  token of all n sequences; the median step is kept;
- engine-invariant: the same as `batch_invariant = true` loads it (plain weights, flash
  attention off);
- llama-server: --parallel n, the same n prompts (as token ids) sent at once, greedy, every
  stream --steps + 1 tokens; its own per-token generation time (`timings`), which includes
  its greedy sampling (a fraction of a millisecond per sequence).

Every one runs on the thread count inference-local uses by default; --repeat rounds alternate
the order and keep the median.

    .venv/bin/python bench/decode_step.py --streams 1 4 8 16
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from batching import (
    RESULTS,
    llama_server,
    llama_server_binary,
    llama_server_command,
    stream_request,
)
from helpers import default_model_file

CTX = 512


def engine_step(
    model: Any,
    prompts: list[list[int]],
    steps: int,
    flash_attention: bool | None,
    sample: Callable[[Any, list[int]], list[int]] | None = None,
) -> float:
    """Median milliseconds of one decode of every sequence, in this process, on `model`'s
    weights (an inference_local Model), its logits on the host; with `sample` (the context
    and each sequence's output row, giving its next token), sampling them too."""
    from inference_local.engine import default_threads
    from inference_local.llama_api import Batch, Context, ContextParams

    n = len(prompts)
    params = ContextParams(
        n_seq=n, n_ctx_per_seq=CTX, n_threads=default_threads(), flash_attention=flash_attention
    )
    context = Context(model, params)
    batch = Batch(CTX)
    try:
        for seq, prompt in enumerate(prompts):
            batch.clear()
            batch.add_many(prompt, 0, seq, True)
            context.decode(batch)
        tokens = [1000] * n
        times = []
        for step in range(steps):
            batch.clear()
            rows = [
                batch.add(tokens[seq] if sample else 1000 + step, len(prompt) + step, seq, True)
                for seq, prompt in enumerate(prompts)
            ]
            started = time.perf_counter()
            context.decode(batch)
            if sample is None:
                context.settle_outputs()  # on a GPU the decode returns before its logits do
            else:
                tokens = sample(context, rows)
            times.append(time.perf_counter() - started)
        return statistics.median(times) * 1000
    finally:
        batch.close()
        context.close()


def server_step(url: str, prompts: list[list[int]], steps: int) -> float:
    """llama-server's median per-token generation time over the n streams, all sent at once."""
    return asyncio.run(_server_times(url, prompts, steps))


async def _server_times(url: str, prompts: list[list[int]], steps: int) -> float:
    async def one(client: httpx.AsyncClient, prompt: list[int]) -> float:
        body = {
            "prompt": prompt,
            "n_predict": steps + 1,
            "temperature": 0,
            "ignore_eos": True,
            "cache_prompt": False,
        }
        response = await client.post(f"{url}/completion", json=body)
        response.raise_for_status()
        return float(response.json()["timings"]["predicted_per_token_ms"])

    async with httpx.AsyncClient(timeout=600) as client:
        await one(client, prompts[0][:8])  # warm
        per_stream = await asyncio.gather(*(one(client, p) for p in prompts))
    return statistics.median(per_stream)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()

    from inference_local.engine import default_threads
    from inference_local.llama_api import Model

    state = Path(tempfile.mkdtemp(prefix="slm-bench-decode-"))
    model_file = default_model_file()
    # Both weight layouts are loaded once and serve every level and round, each with the flash
    # attention its load mode gives it.
    variants = {
        "engine": (Model(model_file, repack=True), None),
        "engine-invariant": (Model(model_file), False),
    }
    binary = llama_server_binary()
    results: dict[str, Any] = {"threads": default_threads(), "steps": args.steps, "streams": {}}
    try:
        for n in args.streams:
            prompts = [
                variants["engine"][0].tokenize(stream_request(i, 0, n)["prompt"], add_special=True)
                for i in range(n)
            ]
            command = llama_server_command(binary, model_file, n, CTX, default_threads())
            with llama_server(command, state / f"ls-{n}.log") as url:
                measure: dict[str, Callable[[], float]] = {
                    name: functools.partial(engine_step, model, prompts, args.steps, flash)
                    for name, (model, flash) in variants.items()
                }
                measure["llama-server"] = functools.partial(server_step, url, prompts, args.steps)
                runs: dict[str, list[float]] = {name: [] for name in measure}
                for round_ in range(args.repeat):
                    order = list(measure) if round_ % 2 == 0 else list(reversed(measure))
                    for name in order:
                        runs[name].append(measure[name]())
            medians = {name: statistics.median(values) for name, values in runs.items()}
            results["streams"][str(n)] = {"ms_per_step": medians, "runs": runs}
            ratios = "  ".join(
                f"{name} x{medians['llama-server'] / ms:.2f}"
                for name, ms in medians.items()
                if name != "llama-server"
            )
            steps_text = "  ".join(f"{name} {ms:6.1f}" for name, ms in medians.items())
            print(f"n={n:<3} ms/step: {steps_text}   speed vs llama-server: {ratios}", flush=True)
    finally:
        for model, _ in variants.values():
            model.close()
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "decode_step.json").write_text(json.dumps(results, indent=2))
    print(f"\nJSON: {RESULTS / 'decode_step.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
