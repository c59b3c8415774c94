"""Continuous batching on a CUDA GPU: inference-local's Engine, in this process, against
llama.cpp's C++ `llama-server`, both over one CUDA build of the same llama.cpp sources.

A one-off measurement that runs on a CUDA machine (the device `run` tool's H100), not part of
`make bench-batching`. Up to four servers (--servers) take turns at 1, 16 and 64 concurrent
streams (--concurrency):
- engine: the Engine with its default sample_threads (one sampling thread per core, at most 8);
- engine-fullvocab: the same Engine object with every sampler on llama.cpp's full-vocabulary
  path (`llama_sampler_sample`) instead of a shortlist, each row a sampling task of its own as
  for a chain without top_k, which measures what the shortlist gains;
- engine-serial: an Engine with sample_threads=1, each sequence sampled in turn on the decode
  thread;
- llama-server: --parallel N, -c 512*N, -t and -tb the Engine's n_threads (all cores but one).
Each level is bench/batching.py's level(), imported, so the requests and the statistics are
batching.py's, and so are llama-server's command and process (llama_server_command(),
llama_server()) and the in-process Engine (direct_engine()). Each stream has a ~120-token
prompt, a fixed seed per request, and 128 output tokens with the end-of-generation tokens banned.
Each Engine gets `parallel` equal to the concurrency and 512 tokens of context a slot. Every layer
goes to the GPU in all of them (gpu_layers -1, -ngl all). They all stay up during a level and
take turns, every other round in reverse order (--repeat rounds); the run with the median
throughput is kept. The JSON goes to --out, with a Markdown table and the ratios of the engine to
each of the others. llama-server logs each level beside --log, in llama-server-1.log,
llama-server-16.log and so on.

The device machine starts bare. Setup, in calls made one right after another:
- carry the Python wheels the services need and a pruned llama.cpp source tarball;
- build it with CMake (-DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 -DBUILD_SHARED_LIBS=ON
  -DLLAMA_BUILD_APP=OFF -DLLAMA_CURL=OFF, targets llama-server and llama; the pruned tree needs
  scripts/ui-assets.cmake), about 5 minutes on 16 cores. llama_cpp's Python files load its
  libllama.so through LLAMA_CPP_LIB_PATH;
- carry the GGUF model in chunks of under 64 MiB, written at their offsets and checked by sha256.
Then:

    PYTHONPATH=/tmp/site LLAMA_CPP_LIB_PATH=/tmp/gb/build/bin \
    LLAMA_SERVER=/tmp/gb/build/bin/llama-server PYTHONUNBUFFERED=1 \
        python3 bench/gpu_engine.py --model /tmp/gb/models/gemma-3-270m-q4_k_m.gguf \
        --out $OUT/gpu_engine.json --log $OUT/llama-server.log
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "services"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import llama_cpp

# The requests, the streams and their statistics: bench/batching.py's level(), used as is (it
# puts tests/ on sys.path for helpers.py). Imported by name, not with an import statement, so
# that mypy run on this file alone, with neither tests/ nor services/ on its path, does not
# follow into batching.py; the project-wide mypy checks batching.py itself.
batching: Any = importlib.import_module("batching")


def engine_at(model: Path, c: int, ctx: int, sample_threads: int | None) -> Any:
    """batching.direct_engine on `model` with `c` slots of `ctx` tokens."""
    from inference_local.config import InferenceLocalConfig, ModelConfig  # type: ignore[import-not-found, unused-ignore]

    base = InferenceLocalConfig(models_dir=model.parent)
    entry = base.models[0]
    models = [
        ModelConfig(
            **{
                **entry.model_dump(),
                "path": model.name,
                "parallel": c,
                "context_length": ctx,
                "gpu_layers": -1,  # every layer on the GPU, refused on a build without one
            }
        )
    ]
    config = base.model_copy(update={"models": models, "sample_threads": sample_threads})
    return batching.direct_engine(config)


def gpu_memory() -> str:
    with contextlib.suppress(Exception):
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        return out.stdout.strip()
    return "?"


SERVERS = ("engine", "engine-fullvocab", "engine-serial", "llama-server")


class FullVocabulary:
    """An Engine whose samplers take llama.cpp's full-vocabulary path (`llama_sampler_sample`)
    instead of the shortlist: the same tokens, for an A/B of the shortlist's cost. Levels run one
    at a time, so the switch is on exactly while this engine's streams run."""

    streams = 0

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    async def generate(self, request: Any) -> Any:
        FullVocabulary.streams += 1
        try:
            async for event in self.engine.generate(request):
                yield event
        finally:
            FullVocabulary.streams -= 1


def _patch_shortlist() -> None:
    """Samplers are shortlisted only while no FullVocabulary stream runs; otherwise each row is
    a task of its own on llama.cpp's path, as for a chain without top_k."""
    from inference_local.llama_api import Sampler  # type: ignore[import-not-found, unused-ignore]

    shortlisted = vars(Sampler)["shortlisted"].fget
    Sampler.shortlisted = property(  # type: ignore[method-assign, assignment, unused-ignore]
        lambda self: not FullVocabulary.streams and shortlisted(self)
    )


async def run_all(args: argparse.Namespace) -> dict[str, Any]:
    from inference_local.engine import (  # type: ignore[import-not-found, unused-ignore]
        default_sample_threads,
        default_threads,
    )

    threads = default_threads()
    sample_threads = default_sample_threads()
    model = Path(args.model)
    log = Path(args.log)  # one llama-server log a level, e.g. llama-server-16.log
    results: dict[str, Any] = {
        "concurrency": args.concurrency,
        "max_tokens": args.max_tokens,
        "ctx_per_seq": args.ctx,
        "repeat": args.repeat,
        "threads": threads,
        "sample_threads": {
            "engine": sample_threads,
            "engine-fullvocab": sample_threads,
            "engine-serial": 1,
        },
        "gpu_offload": bool(llama_cpp.llama_supports_gpu_offload()),
        "servers": {},
    }
    print(
        f"llama_supports_gpu_offload={results['gpu_offload']} threads={threads} "
        f"sample_threads={sample_threads}",
        flush=True,
    )
    _patch_shortlist()
    for c in args.concurrency:
        async with contextlib.AsyncExitStack() as stack:
            targets: dict[str, Any] = {}
            if {"engine", "engine-fullvocab"} & set(args.servers):
                engine = await stack.enter_async_context(engine_at(model, c, args.ctx, None))
                if "engine" in args.servers:
                    targets["engine"] = engine
                if "engine-fullvocab" in args.servers:
                    targets["engine-fullvocab"] = FullVocabulary(engine)
            if "engine-serial" in args.servers:
                serial = await stack.enter_async_context(engine_at(model, c, args.ctx, 1))
                targets["engine-serial"] = serial
            print(f"c={c}: engines loaded, GPU memory used {gpu_memory()}", flush=True)
            if "llama-server" in args.servers:
                level_log = log.with_name(f"{log.stem}-{c}{log.suffix}")
                # Every layer on the GPU.
                binary = os.environ["LLAMA_SERVER"]
                command = batching.llama_server_command(binary, model, c, args.ctx, threads, -1)
                print("llama-server:", " ".join(command), flush=True)
                targets["llama-server"] = stack.enter_context(
                    batching.llama_server(command, level_log)
                )
                print(f"c={c}: llama-server up, GPU memory used {gpu_memory()}", flush=True)
            levels = await batching.interleaved(targets, c, args.max_tokens, args.repeat)
            for name, r in levels.items():
                results["servers"].setdefault(name, {})[str(c)] = r
    return results


def report(results: dict[str, Any]) -> str:
    servers = results["servers"]
    lines = [
        "| streams | server | tok/s | TTFT p50 ms | ITL p50 ms | ITL p99 ms | runs tok/s |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    names = [name for name in SERVERS if name in servers]
    for c in results["concurrency"]:
        for name in names:
            r = servers[name][str(c)]
            each = ", ".join(f"{x:.0f}" for x in r["runs_tokens_per_s"])
            lines.append(
                f"| {c} | {name} | {r['tokens_per_s']:.1f} | {r['ttft_p50_ms']:.1f} | "
                f"{r['itl_p50_ms']:.2f} | {r['itl_p99_ms']:.2f} | {each} |"
            )
    for other in names[1:] if "engine" in servers else ():
        lines += ["", f"| streams | engine/{other} tok/s | TTFT p50 | ITL p50 | ITL p99 |"]
        lines += ["| --- | --- | --- | --- | --- |"]
        for c in results["concurrency"]:
            e, s = servers["engine"][str(c)], servers[other][str(c)]
            ratios = [
                e[key] / s[key]
                for key in ("tokens_per_s", "ttft_p50_ms", "itl_p50_ms", "itl_p99_ms")
            ]
            lines.append(f"| {c} | " + " | ".join(f"x{x:.2f}" for x in ratios) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--ctx", type=int, default=512, help="context per sequence")
    parser.add_argument("--repeat", type=int, default=3, help="runs per level (median kept)")
    parser.add_argument("--servers", nargs="+", default=list(SERVERS), choices=SERVERS)
    parser.add_argument("--out", default="gpu_engine.json")
    parser.add_argument("--log", default="/tmp/llama-server.log")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    results = asyncio.run(run_all(args))
    table = report(results)
    results["table"] = table
    Path(args.out).write_text(json.dumps(results, indent=2))
    print("\n" + table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
