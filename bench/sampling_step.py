"""A decode step with the logits sampled on the host: decode alone, then decode and sampling
with each of the sampler's two shortlists, for chains with and without a logit bias.

`Sampler.sample_many` hands llama.cpp a shortlist of each row's candidates. The tight one
(`Sampler._shortlists`, the default for free rows) takes one elementwise maximum over 64
interleaved slices of the row; the wide one (`Sampler._wide_shortlists`, what masked rows
use) thresholds the whole row from every n-th logit. For n sequences of bench/batching.py's
prompts, this reports the median step (bench/decode_step.py's engine_step: inference-local's
context on its defaults) for:

- decode only: llama_decode plus the wait for its logits on the host, no sampling;
- tight / wide with the GPU bench's chain (the engine's default sampling at temperature 0.8,
  its end-of-generation tokens banned by a logit bias), that chain less its bias, and greedy.

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
import contextlib
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "services"))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from batching import NO_EOS, stream_request
from decode_step import engine_step
from helpers import default_model_file

from inference_local.llama_api import Model, Sampler, gpu_offload_supported
from inference_local.sampling import Sampling

CHAINS = {
    "bench chain": Sampling(seed=7, logit_bias={int(t): b for t, b in NO_EOS.items()}),
    "no bias": Sampling(seed=7),
    "greedy": Sampling(seed=7, temperature=0.0),
}


@contextlib.contextmanager
def shortlisting(way: Callable[..., Any]) -> Iterator[None]:
    """Free rows take `way`'s shortlist while inside."""
    default = Sampler._shortlists
    Sampler._shortlists = way  # type: ignore[method-assign]
    try:
        yield
    finally:
        Sampler._shortlists = default  # type: ignore[method-assign]


def sampled_step(
    model: Model,
    prompts: list[list[int]],
    sampling: Sampling,
    steps: int,
    pool: concurrent.futures.Executor,
) -> float:
    samplers = [Sampler(model, sampling.sampler_config()) for _ in prompts]
    try:
        return engine_step(
            model,
            prompts,
            steps,
            None,
            lambda context, rows: Sampler.sample_many(
                context, list(zip(samplers, rows, strict=True)), pool
            ),
        )
    finally:
        for sampler in samplers:
            sampler.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="default: the bundled model")
    parser.add_argument("--streams", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--threads", type=int, default=7, help="sampling pool threads")
    parser.add_argument("--gpu-layers", type=int, default=None, help="default: all on a GPU")
    args = parser.parse_args()
    if args.gpu_layers is None:
        args.gpu_layers = -1 if gpu_offload_supported() else 0
    model = Model(args.model or default_model_file(), gpu_layers=args.gpu_layers)
    pool = concurrent.futures.ThreadPoolExecutor(args.threads)
    ways = {"tight": Sampler._shortlists, "wide": Sampler._wide_shortlists}
    print("| streams | chain | decode only ms | tight ms | wide ms |")
    print("| --- | --- | --- | --- | --- |")
    try:
        for n in args.streams:
            prompts = [
                model.tokenize(stream_request(i, 0, n)["prompt"], add_special=True)
                for i in range(n)
            ]
            alone = engine_step(model, prompts, args.steps, None)
            for name, sampling in CHAINS.items():
                ms = []
                for way in ways.values():
                    with shortlisting(way):
                        ms.append(sampled_step(model, prompts, sampling, args.steps, pool))
                print(f"| {n} | {name} | {alone:.2f} | {ms[0]:.2f} | {ms[1]:.2f} |", flush=True)
    finally:
        pool.shutdown()
        model.close()


if __name__ == "__main__":
    main()
