"""Prefix caching: time to first token for requests sharing a 2,000-token prefix.

In one run, on the default model with a 4,096-token context:
- cold: the first request, nothing cached;
- warm, same process: another question after the same prefix, restored from inference-local's
  own memory;
- after restarting inference-local: restored from the kv-cache service;
- on a second inference-local replica sharing the kv-cache service;
- llama.cpp's llama-server (built by bench/build_llama_server.sh) with cache_prompt, cold and
  warm in its single slot (--swa-full, without which it cannot reuse a Gemma 3 prefix).

Also checks that a warm answer is identical to the cold one at temperature 0 and reports the
decode thread's state-copy cost. Writes bench/results/kv_prefix.json.

    .venv/bin/python bench/kv_prefix.py
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from helpers import DEFAULT_MODEL, SHARED_MODELS_DIR, free_port, metric_value, to_toml

from inference_local.config import InferenceLocalConfig, ModelConfig
from kvcache.config import KVCacheConfig
from mesh.settings import Settings
from mesh.supervisor import grpc_serving
from slm.config import ServiceEndpoint
from slm.v1 import inference_pb2, inference_pb2_grpc, types_pb2

RESULTS = Path(__file__).parent / "results"
MODEL_FILE = "gemma-3-270m-q4_k_m.gguf"
QUESTIONS = (
    "Which clause sets the highest payment?",
    "On which day is clause 12 paid?",
    "Who pays under clause 40?",
    "Summarise the contract in one sentence.",
)


def shared_prefix(n_tokens: int) -> str:
    """A contract of about `n_tokens` tokens of the default model."""
    from inference_local.llama_api import Model

    model = Model(SHARED_MODELS_DIR / MODEL_FILE, vocab_only=True)
    try:
        lines = ["Read this contract carefully, then answer the question after it."]
        i = 0
        while len(model.tokenize("\n".join(lines), add_special=True)) < n_tokens:
            i += 1
            lines.append(
                f"Clause {i}: the tenant pays {i * 37 % 1000} euros to the landlord on day "
                f"{i % 28 + 1} of each month, by bank transfer."
            )
        return "\n".join(lines)
    finally:
        model.close()


def wait_grpc(address: str, proc: subprocess.Popen[bytes], timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {address} served")
        if asyncio.run(grpc_serving(address)):
            return
        time.sleep(0.5)
    raise TimeoutError(f"{address} not serving in {timeout_s}s")


def wait_http(url: str, proc: subprocess.Popen[bytes], timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before {url} answered")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2).status_code == 200:
                return
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer in {timeout_s}s")


@contextlib.contextmanager
def slm_process(name: str, config: Path, address: str, log: Path) -> Iterator[None]:
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mesh.cli", "--config", str(config), "serve", name],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        try:
            wait_grpc(address, proc)
            yield
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


async def generate(address: str, prompt: str, max_tokens: int) -> tuple[float, str]:
    """(seconds to the first streamed token, the whole text) at temperature 0."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        request = inference_pb2.GenerateRequest(
            model=DEFAULT_MODEL,
            prompt=prompt,
            sampling=types_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0),
        )
        started = time.perf_counter()
        first = 0.0
        parts = []
        async for reply in stub.Generate(request, timeout=600):
            if reply.HasField("delta") and not first:
                first = time.perf_counter() - started
            if reply.HasField("delta"):
                parts.append(reply.delta.text)
        return first, "".join(parts)


def llama_server_ttft(url: str, prompt: str, max_tokens: int) -> tuple[float, str]:
    body = {
        "prompt": prompt,
        "n_predict": max_tokens,
        "temperature": 0.0,
        "cache_prompt": True,
        "stream": True,
    }
    started = time.perf_counter()
    first = 0.0
    parts = []
    with httpx.stream("POST", f"{url}/completion", json=body, timeout=600) as response:
        for line in response.iter_lines():
            if not line.startswith("data: "):
                continue
            data = json.loads(line[6:])
            if data.get("content") and not first:
                first = time.perf_counter() - started
            parts.append(data.get("content", ""))
    return first, "".join(parts)


def llama_server_binary(wait_s: float) -> str:
    """The cached llama-server; waits for a build already under way rather than starting a
    second one on a small machine."""
    cache = Path(os.environ.get("SLM_BENCH_CACHE", Path.home() / ".cache/service-slm/bench"))
    deadline = time.monotonic() + wait_s
    while not list(cache.glob("llama-server-*/build/bin/llama-server")):
        if not list(cache.glob("build.*")) or time.monotonic() > deadline:
            break
        time.sleep(10)
    script = Path(__file__).parent / "build_llama_server.sh"
    out = subprocess.run([str(script)], check=True, capture_output=True, text=True)
    return out.stdout.strip().splitlines()[-1]


def inference_settings(state: Path, kv_address: str, kv_port: int) -> Settings:
    return Settings(
        state_dir=state,
        inference_local=InferenceLocalConfig(
            endpoint=ServiceEndpoint(port=free_port(), metrics_port=free_port()),
            models_dir=SHARED_MODELS_DIR,
            models=[
                ModelConfig(name=DEFAULT_MODEL, path=MODEL_FILE, context_length=4096, parallel=2)
            ],
            adapter_registry="",
            kv_cache=kv_address,
            prefix_cache_mb=1024,
        ),
        kv_cache=KVCacheConfig(
            endpoint=ServiceEndpoint(port=kv_port, metrics_port=free_port()),
            disk_dir=state / "kv-cache",
        ),
    )


def metrics(settings: Settings) -> dict[str, float]:
    text = httpx.get(
        f"http://127.0.0.1:{settings.inference_local.endpoint.metrics_port}/metrics", timeout=5
    ).text
    model = {"model": DEFAULT_MODEL}

    def value(name: str, **labels: str) -> float:
        return metric_value(text, f"slm_engine_prefix_cache_{name}", **model, **labels)

    return {
        "requests_memory": value("requests_total", tier="memory"),
        "requests_service": value("requests_total", tier="service"),
        "requests_miss": value("requests_total", tier="miss"),
        "tokens_restored_memory": value("hits_total", tier="memory"),
        "tokens_restored_service": value("hits_total", tier="service"),
        "tokens_queried": value("queries_total"),
        "state_copy_s_sum": value("state_copy_seconds_sum"),
        "state_copy_count": value("state_copy_seconds_count"),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    state = Path(tempfile.mkdtemp(prefix="slm-bench-kv-"))
    prefix = shared_prefix(args.prefix_tokens)
    prompts = [f"{prefix}\nQuestion: {q}\nAnswer:" for q in QUESTIONS]
    kv_port = free_port()
    kv_address = f"127.0.0.1:{kv_port}"
    a = inference_settings(state, kv_address, kv_port)
    b = inference_settings(state, kv_address, kv_port)
    config_a, config_b = state / "a.toml", state / "b.toml"
    config_a.write_text(to_toml(a))
    config_b.write_text(to_toml(b))
    addr_a = f"127.0.0.1:{a.inference_local.endpoint.port}"
    addr_b = f"127.0.0.1:{b.inference_local.endpoint.port}"
    n = args.max_tokens
    results: dict[str, Any] = {
        "model": DEFAULT_MODEL,
        "prefix_tokens": args.prefix_tokens,
        "block_tokens": a.inference_local.prefix_block_tokens,
        "max_tokens": n,
        "cpu_count": os.cpu_count(),
    }
    ttft: dict[str, float] = {}
    with slm_process("kv-cache", config_a, kv_address, state / "kv.log"):
        with slm_process("inference-local", config_a, addr_a, state / "a.log"):
            ttft["cold"], cold_text = asyncio.run(generate(addr_a, prompts[0], n))
            ttft["warm_same_process"], _ = asyncio.run(generate(addr_a, prompts[1], n))
            results["metrics_first_process"] = metrics(a)
        with slm_process("inference-local", config_a, addr_a, state / "a.log"):
            ttft["warm_after_restart"], restart_text = asyncio.run(generate(addr_a, prompts[0], n))
            with slm_process("inference-local", config_b, addr_b, state / "b.log"):
                ttft["warm_second_replica"], _ = asyncio.run(generate(addr_b, prompts[2], n))
                results["metrics_second_replica"] = metrics(b)
    results["warm_identical_to_cold"] = restart_text == cold_text
    results["cold_text"] = cold_text
    # service-slm's part is kept even if llama-server is not there yet.
    print(json.dumps({"ttft_s": ttft}), flush=True)
    if not args.skip_llama_server:
        binary = llama_server_binary(args.build_wait_s)
        port = free_port()
        threads = str(os.cpu_count() or 1)
        command = [
            binary, "-m", str(SHARED_MODELS_DIR / MODEL_FILE), "--host", "127.0.0.1",
            "--port", str(port), "--parallel", "1", "-c", "4096", "-t", threads, "-tb", threads,
            "--swa-full", "--no-webui",
        ]  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        with (state / "llama-server.log").open("wb") as out:
            proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
            try:
                wait_http(f"{url}/health", proc)
                ttft["llama_server_cold"], _ = llama_server_ttft(url, prompts[0], n)
                ttft["llama_server_warm"], _ = llama_server_ttft(url, prompts[1], n)
            finally:
                proc.terminate()
                proc.wait(30)
    results["ttft_s"] = {k: round(v, 4) for k, v in ttft.items()}
    cold = ttft["cold"]
    results["ratio_to_cold"] = {
        k: round(v / cold, 4) for k, v in ttft.items() if k.startswith("warm")
    }
    if "llama_server_cold" in ttft:
        results["llama_server_ratio"] = round(
            ttft["llama_server_warm"] / ttft["llama_server_cold"], 4
        )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prefix-tokens", type=int, default=2000)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--skip-llama-server", action="store_true")
    parser.add_argument("--build-wait-s", type=float, default=1800)
    parser.add_argument("--out", type=Path, default=RESULTS / "kv_prefix.json")
    args = parser.parse_args()
    results = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
