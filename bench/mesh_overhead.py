"""Latency the mesh adds (Envoy -> gateway -> Doorman -> inference-local) over in-process engines,
hop by hop.

Two in-process baselines: llama-cpp-python's high-level API (llama_cpp), and inference-local's
own continuous-batching engine (engine) driven in-process. Then the same request entering the
mesh at each hop: inference-local's gRPC Generate (inference_grpc), the Doorman's gRPC Complete
(doorman_grpc), the gateway's HTTP port (gateway_http), and Envoy, over HTTP (mesh_http) and
gRPC (mesh_grpc). Every path does identical work per request: the same prompt tokens, a full
prefill and greedy decoding, so each path minus the one below it is one hop. Runs are
interleaved, and each hop's cost is the median of its per-iteration differences, so that
machine noise hits every path alike and cancels. A short prompt (--prompt) keeps the engine's
own time, and with it the noise the differences must see through, small.

    make bench            # or: .venv/bin/python bench/mesh_overhead.py --iterations 50
    .venv/bin/python bench/mesh_overhead.py --iterations 200 --max-tokens 1 --prompt "Hi"
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from helpers import DEFAULT_MODEL, Mesh, default_model_file, mesh_settings

from slm.v1 import doorman_pb2, doorman_pb2_grpc, inference_pb2, inference_pb2_grpc, types_pb2

PROMPT = "Write a long story about a lighthouse keeper who finds a message in a bottle."
RESULTS = Path(__file__).parent / "results"
PATHS = (
    "llama_cpp",
    "engine",
    "inference_grpc",
    "doorman_grpc",
    "gateway_http",
    "mesh_http",
    "mesh_grpc",
)
# What each hop adds: the path entering above it minus the path entering below it.
HOPS = {
    "inference-local gRPC (servicer)": ("inference_grpc", "engine"),
    "Doorman": ("doorman_grpc", "inference_grpc"),
    "gateway (HTTP -> gRPC)": ("gateway_http", "doorman_grpc"),
    "Envoy (HTTP)": ("mesh_http", "gateway_http"),
    "Envoy (gRPC)": ("mesh_grpc", "doorman_grpc"),
}


@dataclass(frozen=True)
class Sample:
    ttft_s: float
    total_s: float
    tokens: int


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def direct(llama: Any, prompt: str, max_tokens: int) -> Sample:
    """The engine's own call, in-process, as inference-local makes it."""
    tokens = llama.tokenize(prompt.encode(), add_bos=True, special=True)
    start = time.perf_counter()
    llama.reset()
    ttft = 0.0
    count = 0
    for chunk in llama.create_completion(
        tokens,
        max_tokens=max_tokens,
        temperature=0.0,
        top_p=1.0,
        repeat_penalty=1.0,
        stream=True,
        seed=1,
    ):
        if chunk["choices"][0]["text"]:
            if count == 0:
                ttft = time.perf_counter() - start
            count += 1
    return Sample(ttft or time.perf_counter() - start, time.perf_counter() - start, count)


def through_http(client: httpx.Client, url: str, prompt: str, max_tokens: int) -> Sample:
    """OpenAI /v1/completions, streamed, through Envoy."""
    body = {
        "model": DEFAULT_MODEL,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "top_p": 1.0,
        "seed": 1,
        "stream": True,
    }
    start = time.perf_counter()
    ttft = 0.0
    count = 0
    with client.stream("POST", f"{url}/v1/completions", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choices = json.loads(line[6:]).get("choices") or [{}]
            if choices[0].get("text"):
                if count == 0:
                    ttft = time.perf_counter() - start
                count += 1
    return Sample(ttft or time.perf_counter() - start, time.perf_counter() - start, count)


async def timed_stream(responses: Any) -> Sample:
    """Time a gRPC stream of responses with `delta` and `end` (Doorman's or InferenceService's)."""
    start = time.perf_counter()
    ttft = 0.0
    count = 0
    async for response in responses:
        if response.HasField("delta") and response.delta.text:
            if count == 0:
                ttft = time.perf_counter() - start
            count += 1
    return Sample(ttft or time.perf_counter() - start, time.perf_counter() - start, count)


def sampling(max_tokens: int) -> types_pb2.SamplingParams:
    return types_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0, top_p=1.0, seed=1)


async def through_grpc(stub: Any, prompt: str, max_tokens: int) -> Sample:
    """DoormanService.Complete (through Envoy, or on the Doorman's own port)."""
    request = doorman_pb2.CompleteRequest(
        model=DEFAULT_MODEL, prompt=prompt, sampling=sampling(max_tokens)
    )
    return await timed_stream(stub.Complete(request))


async def through_inference(stub: Any, prompt: str, max_tokens: int) -> Sample:
    """InferenceService.Generate on inference-local's own port: the engine behind one gRPC hop."""
    request = inference_pb2.GenerateRequest(
        model=DEFAULT_MODEL, prompt=prompt, sampling=sampling(max_tokens)
    )
    return await timed_stream(stub.Generate(request))


async def in_process_engine(engine: Any, prompt: str, max_tokens: int) -> Sample:
    """inference-local's own engine (continuous batching scheduler) called in-process: the
    baseline that isolates what the mesh's hops add."""
    from inference_local.engine import Delta, Request
    from inference_local.sampling import Sampling

    request = Request(
        DEFAULT_MODEL,
        Sampling(max_tokens=max_tokens, temperature=0.0, top_p=1.0, seed=1),
        prompt=prompt,
    )
    start = time.perf_counter()
    ttft = 0.0
    count = 0
    async for event in engine.generate(request):
        if isinstance(event, Delta) and event.text:
            if count == 0:
                ttft = time.perf_counter() - start
            count += 1
    return Sample(ttft or time.perf_counter() - start, time.perf_counter() - start, count)


def summary(samples: list[Sample]) -> dict[str, float]:
    ttft = [s.ttft_s * 1000 for s in samples]
    total = [s.total_s * 1000 for s in samples]
    return {
        "ttft_p50_ms": statistics.median(ttft),
        "ttft_p99_ms": percentile(ttft, 99),
        "total_p50_ms": statistics.median(total),
        "total_p99_ms": percentile(total, 99),
        "tokens": statistics.median([s.tokens for s in samples]),
    }


def paired(upper: list[Sample], lower: list[Sample]) -> dict[str, float]:
    """What `upper` adds over `lower`, iteration by iteration: both ran back to back in each
    iteration, so a slow moment of the shared machine lands in both and cancels out."""
    total = [(u.total_s - lo.total_s) * 1000 for u, lo in zip(upper, lower, strict=True)]
    ttft = [(u.ttft_s - lo.ttft_s) * 1000 for u, lo in zip(upper, lower, strict=True)]
    return {
        "p50_ms": statistics.median(total),
        "p99_ms": percentile(total, 99),
        "ttft_p50_ms": statistics.median(ttft),
    }


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--iterations", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--prompt", default=PROMPT, help="the prompt every path completes")
    parser.add_argument("--max-tokens", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--out", type=Path, default=RESULTS / "mesh_overhead.json")
    args = parser.parse_args()
    prompt: str = args.prompt

    from llama_cpp import Llama

    from inference_local.config import InferenceLocalConfig
    from inference_local.engine import default_threads

    state = Path(tempfile.mkdtemp(prefix="slm-bench-"))
    settings = mesh_settings(state)
    entry = InferenceLocalConfig().models[0]
    model_file = default_model_file()
    llama = Llama(
        model_path=str(model_file),
        n_ctx=entry.context_length,
        n_threads=default_threads(),  # as inference-local's default
        n_batch=512,
        verbose=False,
    )
    from prometheus_client import CollectorRegistry

    from inference_local.engine import Engine

    engine = Engine(
        settings.inference_local.model_copy(update={"keep_alive_s": 0}), CollectorRegistry()
    )
    await engine.start()
    mesh = Mesh(settings, state / "slm.toml", state / "mesh.log")
    mesh.start()
    results: dict[str, Any] = {
        "iterations": args.iterations,
        "prompt": prompt,
        "cpu_count": os.cpu_count(),
        "hops": {},
    }
    try:
        gateway_url = f"http://127.0.0.1:{settings.gateway.port}"
        async with (
            grpc.aio.insecure_channel(mesh.grpc_target) as channel,
            grpc.aio.insecure_channel(settings.doorman.endpoint.address) as doorman_channel,
            grpc.aio.insecure_channel(settings.inference_local.endpoint.address) as local,
        ):
            stub = doorman_pb2_grpc.DoormanServiceStub(channel)
            doorman = doorman_pb2_grpc.DoormanServiceStub(doorman_channel)
            inference = inference_pb2_grpc.InferenceServiceStub(local)
            with httpx.Client(timeout=120) as client:
                for max_tokens in args.max_tokens:
                    runs: dict[str, list[Sample]] = {name: [] for name in PATHS}
                    for i in range(args.warmup + args.iterations):
                        samples = {
                            "llama_cpp": direct(llama, prompt, max_tokens),
                            "engine": await in_process_engine(engine, prompt, max_tokens),
                            "inference_grpc": await through_inference(
                                inference, prompt, max_tokens
                            ),
                            "doorman_grpc": await through_grpc(doorman, prompt, max_tokens),
                            "gateway_http": through_http(client, gateway_url, prompt, max_tokens),
                            "mesh_http": through_http(client, mesh.base_url, prompt, max_tokens),
                            "mesh_grpc": await through_grpc(stub, prompt, max_tokens),
                        }
                        if i >= args.warmup:
                            for name, sample in samples.items():
                                runs[name].append(sample)
                    case = f"max_tokens_{max_tokens}"
                    results[case] = {n: summary(s) for n, s in runs.items()}
                    results["hops"][case] = {
                        hop: paired(runs[upper], runs[lower])
                        for hop, (upper, lower) in HOPS.items()
                    } | {
                        f"{path} over engine": paired(runs[path], runs["engine"])
                        for path in ("mesh_http", "mesh_grpc")
                    }
    finally:
        mesh.stop()
        llama.close()
        await engine.close()

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"\nmesh overhead vs in-process engines ({args.iterations} interleaved runs each)")
    print(
        f"{'case':<22}{'path':<16}{'TTFT p50':>10}{'TTFT p99':>10}{'total p50':>11}"
        f"{'total p99':>11}{'tokens':>8}"
    )
    for max_tokens in args.max_tokens:
        case = f"max_tokens_{max_tokens}"
        for path, s in results[case].items():
            print(
                f"{'max_tokens=' + str(max_tokens):<22}{path:<16}{s['ttft_p50_ms']:>9.2f}m"
                f"{s['ttft_p99_ms']:>9.2f}m{s['total_p50_ms']:>10.2f}m{s['total_p99_ms']:>10.2f}m"
                f"{s['tokens']:>8.0f}"
            )
        print("  added, paired by iteration (median and p99 of the differences):")
        for hop, d in results["hops"][case].items():
            print(
                f"    {hop:<34} p50 {d['p50_ms']:+.2f} ms  p99 {d['p99_ms']:+.2f} ms  "
                f"TTFT p50 {d['ttft_p50_ms']:+.2f} ms"
            )
    print(f"\nJSON: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
