"""A decode step with the logits sampled on the host: decode alone, then decode and sampling
with each of the sampler's two shortlists, for chains with and without a logit bias.

`Sampler.sample_many` hands llama.cpp a shortlist of each row's candidates. The tight one
(`Sampler._shortlists`, the default for free rows) takes one elementwise maximum over 64
interleaved slices of the row; the wide one (`Sampler._wide_shortlists`, what masked rows
use) thresholds the whole row from every n-th logit. This runs n sequences through --steps
decode steps of one token each and reports the median step for:

- decode only: llama_decode plus the wait for its logits on the host, no sampling;
- tight / wide with the GPU bench's chain (top_k 40, top_p 0.95, min_p 0.05, temperature 0.8,
  a logit bias on two tokens), with that chain less its bias, and greedy.

Sampling runs on a pool of --threads threads beside the decoding one, as inference-local's
`sample_threads` does. On a CUDA build (the device machine; see bench/gpu_engine.py for the
setup) every layer goes to the GPU by default, elsewhere none (--gpu-layers sets it). It is a
GPU measurement: on this 2-core CPU a step's decode (70 ms at 8 streams, 216 at 32) hides the
sampling's milliseconds in its noise, so `make bench` leaves it out.

    .venv/bin/python bench/sampling_step.py --streams 16 64
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "services"))

from inference_local.llama_api import (
    Batch,
    Context,
    ContextParams,
    Model,
    Sampler,
    SamplerConfig,
)

CHAIN = SamplerConfig(
    temperature=0.8,
    top_k=40,
    top_p=0.95,
    min_p=0.05,
    repetition_penalty=1.0,
    presence_penalty=0.0,
    frequency_penalty=0.0,
    seed=7,
    logit_bias={1: -100.0, 106: -100.0},
)
CHAINS = {
    "bench chain": CHAIN,
    "no bias": dataclasses.replace(CHAIN, logit_bias={}),
    "greedy": dataclasses.replace(CHAIN, temperature=0.0, logit_bias={}),
}
PROMPT = "Story. The lighthouse stood at the edge of the northern cliffs. Continue:"


def step_ms(
    model: Model,
    n: int,
    config: SamplerConfig,
    shortlists: object | None,
    steps: int,
    pool: concurrent.futures.Executor,
) -> float:
    """The median decode step of n sequences, sampled with `shortlists` (None: not at all)."""
    original = Sampler._shortlists
    Sampler._shortlists = shortlists or original  # type: ignore[assignment,method-assign]
    context = Context(model, ContextParams(n_seq=n, n_ctx_per_seq=256, backend_sampling=False))
    samplers = [Sampler(model, config) for _ in range(n)]
    batch = Batch(512)
    try:
        prompt = model.tokenize(PROMPT, add_special=True)
        last = []
        for seq in range(n):
            batch.clear()
            index = batch.add_many(prompt, 0, seq, True)
            context.decode(batch)
            last.append(Sampler.sample_many(context, [(samplers[seq], index)])[0])
        times = []
        for step in range(steps + 10):  # the first 10 warm up
            batch.clear()
            rows = [batch.add(last[seq], len(prompt) + step, seq, True) for seq in range(n)]
            start = time.perf_counter()
            context.decode(batch)
            if shortlists is None:
                context.settle_outputs()
            else:
                work = [(samplers[seq], rows[seq]) for seq in range(n)]
                last = Sampler.sample_many(context, work, pool)
            times.append(time.perf_counter() - start)
        return statistics.median(times[10:]) * 1e3
    finally:
        Sampler._shortlists = original  # type: ignore[method-assign]
        batch.close()
        for sampler in samplers:
            sampler.close()
        context.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="a GGUF (default: the bundled model)")
    parser.add_argument("--streams", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--threads", type=int, default=7, help="sampling pool threads")
    parser.add_argument("--gpu-layers", type=int, default=None, help="default: all on a GPU")
    args = parser.parse_args()
    if args.model is None:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
        from helpers import default_model_file

        args.model = str(default_model_file())
    if args.gpu_layers is None:
        import llama_cpp  # loaded by inference_local already, after its environment is set

        args.gpu_layers = -1 if llama_cpp.llama_supports_gpu_offload() else 0
    model = Model(Path(args.model), gpu_layers=args.gpu_layers)
    pool = concurrent.futures.ThreadPoolExecutor(args.threads)
    tight, wide = Sampler._shortlists, Sampler._wide_shortlists
    print("| streams | chain | decode only ms | tight ms | wide ms |")
    print("| --- | --- | --- | --- | --- |")
    for n in args.streams:
        alone = step_ms(model, n, CHAIN, None, args.steps, pool)
        for name, config in CHAINS.items():
            ms = [step_ms(model, n, config, way, args.steps, pool) for way in (tight, wide)]
            print(f"| {n} | {name} | {alone:.2f} | {ms[0]:.2f} | {ms[1]:.2f} |", flush=True)
    pool.shutdown()
    model.close()


if __name__ == "__main__":
    main()
