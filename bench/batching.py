"""Continuous batching: aggregate throughput, TTFT and inter-token latency under concurrency.

Servers on the same model and machine, in one run, each as its users start it:
- service-slm, the whole mesh through Envoy, on `make run`'s defaults (inference-local sizes
  its threads and sequence slots from the machine);
- the direct engine: inference-local's Engine in this process with the same defaults and no
  mesh, which shows what the mesh costs (with --servers engine-invariant also the same with
  `batch_invariant = true`, which shows what that guarantee costs);
- llama.cpp's C++ `llama-server` as its documentation says for the load: every core
  (-t/-tb nproc) and a slot per stream (--parallel equal to the concurrency, -c that many times
  the context per slot), built from the sources vendored in the llama-cpp-python sdist
  (bench/build_llama_server.sh, not committed);
- with --servers llama_cpp.server, llama-cpp-python's own OpenAI server (one sequence at a time).
--settings tuned instead gives the mesh and the engine `parallel` equal to the highest
concurrency and --ctx tokens a slot (hand-tuned; labelled so in the JSON).

Every request streams a ~120-token prompt (/v1/completions over HTTP; Engine.generate for the
direct engine), a fixed seed per request, and the end-of-generation tokens banned so that each
produces exactly max_tokens tokens. The servers stay up together and each level runs on all of
them in turn, so a slow minute on a shared machine hits every server; --repeat N runs each
level N times, every other round in reverse order, and keeps the median.

    make bench        # or: .venv/bin/python bench/batching.py --concurrency 1 4 16 32
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import itertools
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from helpers import DEFAULT_MODEL, Mesh, default_model_file, free_port, mesh_settings

RESULTS = Path(__file__).parent / "results"
RUNS = itertools.count(1)
# Gemma 3's <eos> and <end_of_turn>: banned so every stream runs to max_tokens.
NO_EOS = {"1": -100, "106": -100}
PARAGRAPH = (
    "The lighthouse stood at the edge of the northern cliffs, where the wind never rested and "
    "the sea turned grey long before the first storms of autumn. For forty years the keeper had "
    "climbed its spiral stairs each evening to light the great lamp, polishing the lenses until "
    "they shone like water. Ships passing in the night would see the beam sweep across the waves "
    "and know that someone was watching over them. One morning, walking along the shore below "
    "the tower, the keeper found a bottle wedged between two rocks, its glass worn smooth by the "
    "tide. Continue the story:"
)


@dataclass(frozen=True)
class Sample:
    start: float
    first: float
    end: float
    tokens: int
    gaps: tuple[float, ...]
    error: str = ""


@dataclass
class Timeline:
    """One stream's clock: when it started and when each of its tokens arrived."""

    start: float = field(default_factory=time.perf_counter)
    first: float = 0.0
    last: float = 0.0
    tokens: int = 0
    gaps: list[float] = field(default_factory=list)
    # Tokens the server reported (usage, or the engine's End); 0: count the chunks.
    reported: int = 0

    def token(self) -> None:
        """A chunk with text arrived (one token, or several a server sent together)."""
        now = time.perf_counter()
        if self.tokens == 0:
            self.first = now
        else:
            self.gaps.append(now - self.last)
        self.last = now
        self.tokens += 1

    def sample(self, error: str = "") -> Sample:
        last = self.last or self.start
        tokens = self.reported or self.tokens
        return Sample(self.start, self.first or last, last, tokens, tuple(self.gaps), error)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def stream_request(index: int, max_tokens: int, run: int) -> dict[str, Any]:
    """What stream `index` of a run asks every server for."""
    return {
        # Every run has prompts of its own: no server reuses a prompt it saw in an earlier run
        # (llama-server keeps each slot's last prompt cached).
        "prompt": f"Story {run}.{index}. {PARAGRAPH}",
        "max_tokens": max_tokens,
        "temperature": 0.8,
        "top_p": 0.95,
        "seed": 1000 + index,
        "logit_bias": NO_EOS,
    }


async def one_stream(
    client: httpx.AsyncClient, url: str, model: str, index: int, max_tokens: int, run: int
) -> Sample:
    body = {
        "model": model,
        "stream": True,
        # The token count comes from usage: a server may send several tokens in one chunk
        # (the mesh does for a reader that falls behind).
        "stream_options": {"include_usage": True},
        **stream_request(index, max_tokens, run),
    }
    timeline = Timeline()
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
            response.raise_for_status()
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                choices = chunk.get("choices") or [{}]
                if choices[0].get("text"):
                    timeline.token()
                if chunk.get("usage"):
                    timeline.reported = chunk["usage"]["completion_tokens"]
    except httpx.HTTPError as error:
        # llama_cpp.server drops concurrent streams; count them instead of stopping the run.
        return timeline.sample(type(error).__name__)
    return timeline.sample()


async def engine_stream(engine: Any, model: str, index: int, max_tokens: int, run: int) -> Sample:
    """The same request as one_stream, straight to an Engine in this process."""
    from inference_local.engine import Delta, End, Request
    from inference_local.sampling import Sampling

    fields = stream_request(index, max_tokens, run)
    prompt = fields.pop("prompt")
    fields["logit_bias"] = {int(t): b for t, b in fields["logit_bias"].items()}
    request = Request(model, Sampling(**fields), prompt=prompt)
    timeline = Timeline()
    async for event in engine.generate(request):
        if isinstance(event, Delta) and event.text:
            timeline.token()
        elif isinstance(event, End):
            timeline.reported = event.completion_tokens
    return timeline.sample()


async def level(target: str | Any, model: str, concurrency: int, max_tokens: int) -> dict[str, Any]:
    """One level against a URL (OpenAI HTTP) or an Engine object (the direct engine)."""
    return summarise(await level_samples(target, model, concurrency, max_tokens), max_tokens)


async def level_samples(
    target: str | Any, model: str, concurrency: int, max_tokens: int, warm: bool = True
) -> list[Sample]:
    """The streams of one level, each started at once; first one short request warms the
    model unless `warm` is off."""
    run = next(RUNS)
    async with contextlib.AsyncExitStack() as stack:
        stream: Callable[[int, int], Awaitable[Sample]]
        if isinstance(target, str):
            limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=0)
            # A client of its own warms the model; then each stream opens its connection, alike
            # on every server. Reusing the warm-up's keep-alive connection raced with
            # llama-server closing it: the stream failed ("Server disconnected without sending
            # a response") before the server had read it.
            if warm:
                async with httpx.AsyncClient(timeout=600, limits=limits) as first:
                    await one_stream(first, target, model, 999, 4, run)
            client = await stack.enter_async_context(httpx.AsyncClient(timeout=600, limits=limits))
            stream = functools.partial(one_stream, client, target, model, run=run)
        else:
            stream = functools.partial(engine_stream, target, model, run=run)
            if warm:
                await stream(999, 4)
        return list(await asyncio.gather(*(stream(i, max_tokens) for i in range(concurrency))))


def inference_local_fields(pairs: list[str]) -> dict[str, Any]:
    """inference-local fields from FIELD=JSON pairs (a benchmark's --set)."""
    fields = {}
    for pair in pairs:
        name, _, value = pair.partition("=")
        fields[name] = json.loads(value)
    return fields


def summarise(samples: list[Sample], max_tokens: int) -> dict[str, Any]:
    wall = max(s.end for s in samples) - min(s.start for s in samples)
    # Throughput counts only streams that completed: a dropped stream served nobody.
    ok: list[Sample] = []
    failed: list[Sample] = []
    for sample in samples:
        (failed if sample.error or sample.tokens != max_tokens else ok).append(sample)
    tokens = sum(s.tokens for s in ok)
    ttft = [(s.first - s.start) * 1000 for s in ok] or [float("nan")]
    itl = [g * 1000 for s in ok for g in s.gaps]
    return {
        "failed_streams": len(failed),
        # Why they failed: an httpx error's name, or the tokens a stream stopped short at.
        "failures": sorted({s.error or f"{s.tokens} of {max_tokens} tokens" for s in failed}),
        # A level whose one stream failed at once has no wall time: it made nothing.
        "tokens_per_s": tokens / wall if wall > 0 else 0.0,
        "tokens": tokens,
        "wall_s": wall,
        "ttft_p50_ms": statistics.median(ttft),
        "ttft_p99_ms": percentile(ttft, 99),
        "itl_p50_ms": percentile(itl, 50),
        "itl_p99_ms": percentile(itl, 99),
    }


async def interleaved(
    targets: dict[str, Any], concurrency: int, max_tokens: int, repeat: int
) -> dict[str, dict[str, Any]]:
    """One level on every target, `repeat` rounds; prints and returns each target's median run
    (by throughput) with the throughput of all its runs."""
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in targets}
    names = list(targets)
    for round_ in range(repeat):
        # Every other round runs the servers in reverse order, so a machine that speeds up or
        # slows down during the level favours none of them.
        for name in names if round_ % 2 == 0 else names[::-1]:
            runs[name].append(await level(targets[name], DEFAULT_MODEL, concurrency, max_tokens))
    medians: dict[str, dict[str, Any]] = {}
    for name in names:
        ordered = sorted(runs[name], key=lambda run: run["tokens_per_s"])
        r: dict[str, Any] = dict(ordered[len(ordered) // 2])
        r["runs_tokens_per_s"] = [run["tokens_per_s"] for run in runs[name]]
        medians[name] = r
        failed = ""
        if r["failed_streams"]:
            failed = f"  {r['failed_streams']:.0f} failed ({', '.join(r['failures'])})"
        print(
            f"{name:<16} c={concurrency:<3} out={max_tokens:<4} {r['tokens_per_s']:8.1f} tok/s "
            f"TTFT p50 {r['ttft_p50_ms']:8.1f} ms  ITL p50 {r['itl_p50_ms']:6.1f} ms "
            f"p99 {r['itl_p99_ms']:7.1f} ms{failed}",
            flush=True,
        )
    return medians


def wait_http(url: str, process: subprocess.Popen[bytes], timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode} before {url} answered")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2).status_code == 200:
                return
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer in {timeout_s}s")


@contextlib.contextmanager
def process(command: list[str], health: str, log: Path) -> Iterator[None]:
    with log.open("wb") as out:
        proc = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        try:
            wait_http(health, proc)
            yield
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def llama_server_binary() -> str:
    """$LLAMA_SERVER (a GPU build, say), else the CPU build from the vendored sources."""
    if os.environ.get("LLAMA_SERVER"):
        return os.environ["LLAMA_SERVER"]
    script = Path(__file__).parent / "build_llama_server.sh"
    out = subprocess.run([str(script)], check=True, capture_output=True, text=True)
    return out.stdout.strip().splitlines()[-1]


async def run_all(args: argparse.Namespace) -> dict[str, Any]:
    from inference_local.config import InferenceLocalConfig, ModelConfig

    state = Path(tempfile.mkdtemp(prefix="slm-bench-batching-"))
    settings = mesh_settings(state)
    entry = InferenceLocalConfig().models[0]
    model_file = default_model_file()
    fields: dict[str, Any] = {"gpu_layers": args.gpu_layers}
    if args.settings == "tuned":
        fields |= {"parallel": max(args.concurrency), "context_length": args.ctx}
    slots_models = [ModelConfig(**{**entry.model_dump(), **fields})]
    settings.inference_local.models = slots_models
    # Peers get every core, as their documentation starts them.
    threads = str(len(os.sched_getaffinity(0)))
    # A slot of llama-server holds as much context as one of the mesh's.
    ctx = slots_models[0].context_length
    results: dict[str, Any] = {
        "settings": args.settings,
        "concurrency": args.concurrency,
        "max_tokens": args.max_tokens,
        "cpu_count": os.cpu_count(),
        "threads": int(threads),
        "context_per_slot": ctx,
        "gpu_layers": args.gpu_layers,
        "servers": {},
    }

    async def measure(targets: dict[str, Any], c: int, max_tokens: int) -> None:
        levels = await interleaved(targets, c, max_tokens, args.repeat)
        for name, r in levels.items():
            results["servers"].setdefault(name, {})[f"{c}x{max_tokens}"] = r

    # Every server stays up for the whole run and the levels interleave the servers, so that
    # a slow minute on a shared machine hits all of them rather than one.
    urls: dict[str, Any] = {}
    async with contextlib.AsyncExitStack() as stack:
        if "mesh" in args.servers:
            mesh = Mesh(settings, state / "slm.toml", state / "mesh.log")
            mesh.start()
            stack.callback(mesh.stop)
            urls["service-slm"] = mesh.base_url
        for server, invariant in (("engine", False), ("engine-invariant", True)):
            if server not in args.servers:
                continue
            # Invariant: batch_invariant = true, what the same-text-alone-or-batched guarantee
            # costs (plain weights, flash attention off on a CPU).
            config = settings.inference_local.model_copy(update={"batch_invariant": invariant})
            engine = await stack.enter_async_context(direct_engine(config))
            urls["engine (batch-invariant)" if invariant else "engine (direct)"] = engine
        if "llama_cpp.server" in args.servers:
            port = free_port()
            command = [sys.executable, "-m", "llama_cpp.server", "--model", str(model_file)]
            command += ["--host", "127.0.0.1", "--port", str(port), "--n_ctx", str(ctx)]
            command += ["--n_threads", threads, "--n_threads_batch", threads]
            if args.gpu_layers is not None:
                command += ["--n_gpu_layers", str(args.gpu_layers)]
            stack.enter_context(
                process(command, f"http://127.0.0.1:{port}/v1/models", state / "lcp.log")
            )
            urls["llama_cpp.server"] = f"http://127.0.0.1:{port}"
        binary = llama_server_binary() if "llama-server" in args.servers else ""
        for c in args.concurrency:
            with contextlib.ExitStack() as per_level:
                if binary:
                    # --parallel equal to the concurrency, as llama.cpp's docs advise.
                    command = llama_server_command(
                        binary, model_file, c, ctx, int(threads), args.gpu_layers
                    )
                    urls["llama-server"] = per_level.enter_context(
                        llama_server(command, state / f"ls-{c}.log")
                    )
                for max_tokens in args.max_tokens:
                    await measure(urls, c, max_tokens)
    return results


def llama_server_command(
    binary: str, model: Path, c: int, ctx: int, threads: int, gpu_layers: int | None = None
) -> list[str]:
    """llama-server with `c` slots of `ctx` tokens each, on a free loopback port, and
    `gpu_layers` as our model entries read it (-1: all; None: llama-server's default)."""
    command = [binary, "-m", str(model), "--host", "127.0.0.1", "--port", str(free_port())]
    command += ["--parallel", str(c), "-c", str(ctx * c), "-t", str(threads), "-tb", str(threads)]
    if gpu_layers is not None:
        # llama-server reads -1 as "auto" (what memory allows); "all" is what -1 means to
        # llama.cpp's model params and to llama_cpp.server.
        command += ["-ngl", "all" if gpu_layers < 0 else str(gpu_layers)]
    return [*command, "--no-webui"]


@contextlib.contextmanager
def llama_server(command: list[str], log: Path) -> Iterator[str]:
    """Run a llama_server_command until the context ends; yields its base URL."""
    url = f"http://127.0.0.1:{command[command.index('--port') + 1]}"
    with process(command, f"{url}/health", log):
        yield url


@contextlib.asynccontextmanager
async def direct_engine(config: Any) -> AsyncIterator[Any]:
    """inference-local's Engine in this process with `config` (an InferenceLocalConfig), no
    mesh in front; models stay loaded for the whole run."""
    from prometheus_client import CollectorRegistry

    from inference_local.engine import Engine

    engine = Engine(config.model_copy(update={"keep_alive_s": 0}), CollectorRegistry())
    await engine.start()
    try:
        yield engine
    finally:
        await engine.close()


def report(results: dict[str, Any]) -> None:
    servers = results["servers"]
    mesh = servers.get("service-slm", {})
    print("\nratios of service-slm to each peer (throughput: higher is better; TTFT: lower)")
    for peer in (
        "engine (direct)",
        "engine (batch-invariant)",
        "llama_cpp.server",
        "llama-server",
    ):
        for key, ours in mesh.items():
            theirs = servers.get(peer, {}).get(key)
            if theirs and theirs["tokens_per_s"] > 0:
                speed = ours["tokens_per_s"] / theirs["tokens_per_s"]
                ttft = ours["ttft_p50_ms"] / theirs["ttft_p50_ms"]
                # Each round runs both servers within minutes of each other, so the ratio
                # within a round is free of the machine's drift between rounds.
                pairs = zip(ours["runs_tokens_per_s"], theirs["runs_tokens_per_s"], strict=True)
                rounds = [a / b for a, b in pairs if b > 0]  # not the rounds the peer failed
                spread = ""
                if len(rounds) > 1:
                    spread = f"  (rounds x{min(rounds):.2f} to x{max(rounds):.2f})"
                print(
                    f"  vs {peer:<16} {key:<8} throughput x{speed:.2f}{spread}  "
                    f"TTFT p50 x{ttft:.2f}"
                )


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, levels in results["servers"].items():
        for max_tokens in results["max_tokens"]:
            points = sorted(
                (int(k.split("x")[0]), v) for k, v in levels.items() if k.endswith(f"x{max_tokens}")
            )
            xs = [c for c, _ in points]
            axes[0].plot(
                xs,
                [v["tokens_per_s"] for _, v in points],
                marker="o",
                label=f"{name} ({max_tokens} out)",
            )
            axes[1].plot(
                xs,
                [v["ttft_p50_ms"] for _, v in points],
                marker="o",
                label=f"{name} ({max_tokens} out)",
            )
    axes[0].set(xlabel="concurrent streams", ylabel="aggregate output tokens/s", xscale="log")
    axes[1].set(xlabel="concurrent streams", ylabel="TTFT p50 (ms)", xscale="log", yscale="log")
    for ax in axes:
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"continuous batching on {results['cpu_count']} CPU cores, Gemma 3 270M Q4_K_M")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 32])
    parser.add_argument("--max-tokens", type=int, nargs="+", default=[64])
    parser.add_argument(
        "--settings",
        choices=["defaults", "tuned"],
        default="defaults",
        help="defaults: the mesh and engine as `make run` starts them; tuned: --ctx and "
        "parallel equal to the highest concurrency (hand-tuned)",
    )
    parser.add_argument("--ctx", type=int, default=512, help="context per sequence (tuned)")
    parser.add_argument("--repeat", type=int, default=1, help="runs per level (median kept)")
    parser.add_argument(
        "--gpu-layers",
        type=int,
        help="layers on the GPU for every server (-1: all), with a GPU build of llama.cpp: "
        "LLAMA_CPP_LIB_PATH for the mesh and the engine, LLAMA_SERVER for llama-server",
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="directory for the results")
    parser.add_argument(
        "--servers",
        nargs="+",
        default=["mesh", "engine", "llama-server"],
        choices=["mesh", "engine", "engine-invariant", "llama_cpp.server", "llama-server"],
    )
    args = parser.parse_args()
    # SIGTERM unwinds like Ctrl-C, so the servers this run started are stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    results = asyncio.run(run_all(args))
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "batching" if args.settings == "defaults" else f"batching-{args.settings}"
    (args.out / f"{stem}.json").write_text(json.dumps(results, indent=2))
    report(results)
    print(f"\nJSON: {args.out / f'{stem}.json'}")
    try:
        import matplotlib  # noqa: F401  (a dev dependency; absent on a bare GPU machine)
    except ImportError:
        print("no plot: matplotlib is not installed")
    else:
        plot(results, args.out / f"{stem}.png")
        print(f"plot: {args.out / f'{stem}.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
