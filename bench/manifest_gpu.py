"""Standby tier on a CUDA build: the specialist's TTFT after a router request, standby (its
file kept in host memory, uploaded with its context by its first request) against standby with
co_activation and resident. Engine in-process, the router resident on the GPU.

A one-off measurement for the device `run` tool's H100 (not part of `make bench`; the CPU one is
bench/coactivation.py). Setup as bench/gpu_engine.py describes (wheels under /tmp/site, a CUDA
build of llama.cpp's libllama in /tmp/gb/build/bin, the GGUF in /tmp/gb/models), then:

    PYTHONPATH=/tmp/site LLAMA_CPP_LIB_PATH=/tmp/gb/build/bin PYTHONUNBUFFERED=1 \\
        python3 bench/manifest_gpu.py /tmp/gb/models

It copies the GGUF to specialist.gguf beside it (weights of its own) and writes
$OUT/manifest_gpu.json. Results: bench/results/manifest_gpu_2026-12-06.md.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path[:0] = [str(Path(__file__).resolve().parents[1] / "services")]

from prometheus_client import CollectorRegistry  # noqa: E402

from inference_local.config import InferenceLocalConfig, ModelConfig  # noqa: E402
from inference_local.engine import Delta, Engine, Request  # noqa: E402
from inference_local.llama_api import gpu_offload_supported  # noqa: E402
from inference_local.sampling import Sampling  # noqa: E402

FILE = "gemma-3-270m-q4_k_m.gguf"
PROMPT = "Question: which team should handle a failed database migration? Answer:"


def config(models: Path, tier: str, co_activation: bool) -> InferenceLocalConfig:
    return InferenceLocalConfig(
        models_dir=models,
        models=[
            ModelConfig(name="router", path=FILE, tier="resident"),
            ModelConfig(
                name="specialist",
                path="specialist.gguf",
                tier=tier,
                co_activation=["router"] if co_activation else [],
            ),
        ],
        keep_alive_s=0,
        adapter_registry="",
    )


async def first_token_s(engine: Engine, name: str, max_tokens: int) -> float:
    request = Request(name, Sampling(max_tokens=max_tokens, temperature=0), prompt=PROMPT)
    start, first = time.perf_counter(), None
    async for event in engine.generate(request):
        if first is None and isinstance(event, Delta):
            first = time.perf_counter() - start
    return first or 0.0


async def case(models: Path, tier: str, co_activation: bool, trials: int) -> dict[str, Any]:
    engine = Engine(config(models, tier, co_activation), CollectorRegistry())
    started = time.perf_counter()
    await engine.start()
    start_s = time.perf_counter() - started
    states = {m.name: (m.tier, m.state, m.memory_bytes) for m in engine.models()}
    mapping = engine._mapped.get("specialist")
    await first_token_s(engine, "router", 4)
    routers, ttfts = [], []
    for _ in range(trials):
        if tier == "standby" and "specialist" in engine._loaded:
            await engine.unload("specialist")  # back to MAPPED
        began = time.perf_counter()
        await first_token_s(engine, "router", 4)
        routers.append(time.perf_counter() - began)
        ttfts.append(await first_token_s(engine, "specialist", 8))
    await engine.close()
    return {
        "case": tier + (" + co_activation" if co_activation else ""),
        "start_s": round(start_s, 3),
        "states_at_start": states,
        "mapped_weights_on_host_only": mapping is not None and mapping.weights is None,
        "router_ms_p50": round(statistics.median(routers) * 1e3, 1),
        "specialist_ttft_ms": [round(x * 1e3, 1) for x in ttfts],
        "specialist_ttft_ms_p50": round(statistics.median(ttfts) * 1e3, 1),
    }


async def main() -> None:
    models = Path(sys.argv[1])
    if not (models / "specialist.gguf").exists():
        shutil.copyfile(models / FILE, models / "specialist.gguf")
    print("gpu_offload_supported", gpu_offload_supported(), flush=True)
    results = [
        await case(models, "standby", False, 5),
        await case(models, "standby", True, 5),
        await case(models, "resident", False, 5),
    ]
    for result in results:
        print(json.dumps(result), flush=True)
    if out := os.environ.get("OUT"):
        target = Path(out, "manifest_gpu.json")
        await asyncio.to_thread(target.write_text, json.dumps(results, indent=1))


if __name__ == "__main__":
    asyncio.run(main())
