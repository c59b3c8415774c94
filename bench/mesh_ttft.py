"""Where a burst's time to first token goes in the mesh, hop by hop.

N streams start at once through Envoy, as bench/batching.py's level() sends them (a ~120-token
prompt each, --max-tokens tokens, a connection per stream). Every hop keeps a Prometheus
histogram of the time from the request reaching it to its first token: the gateway
(slm_gateway_time_to_first_token_seconds), the Doorman (slm_doorman_ttft_seconds) and
inference-local's engine (slm_engine_ttft_seconds, from the servicer's submission). Their sums and
counts, scraped before and after each burst, give each hop's mean TTFT over that burst's
requests; the client's mean comes from its own clock. The difference between two neighbours is
what the outer one adds: its own work before it calls the next hop, the call, and the first
token's way back.

    .venv/bin/python bench/mesh_ttft.py --streams 16 32 --rounds 3

On a CUDA machine (see bench/gpu_engine.py for the setup), --gpu loads the model as
gpu_engine.py's mesh does (every layer on the GPU, a slot per stream, --ctx tokens a slot).
--hop-replicas N runs the gateway and the Doorman as N processes each (a many-core host), and
each hop's histograms are summed over its replicas.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import batching
from helpers import DEFAULT_MODEL, Mesh, mesh_settings, metrics_urls, with_hop_replicas

RESULTS = Path(__file__).parent / "results"
# Outermost first: each hop's TTFT contains the next one's.
HOPS = {
    "gateway": "slm_gateway_time_to_first_token_seconds",
    "doorman": "slm_doorman_ttft_seconds",
    "engine": "slm_engine_ttft_seconds",
}


def scrape(urls: dict[str, list[str]]) -> dict[str, tuple[float, float]]:
    """(sum, count) of each hop's TTFT histogram, over all its label sets and replicas."""
    totals: dict[str, tuple[float, float]] = {}
    for hop, replicas in urls.items():
        total = count = 0.0
        for url in replicas:
            text = httpx.get(url, timeout=10).text
            for family in text_string_to_metric_families(text):
                if family.name != HOPS[hop]:
                    continue
                for sample in family.samples:
                    if sample.name.endswith("_sum"):
                        total += sample.value
                    elif sample.name.endswith("_count"):
                        count += sample.value
        totals[hop] = (total, count)
    return totals


async def measure(
    mesh: Mesh, urls: dict[str, list[str]], streams: int, args: argparse.Namespace
) -> dict[str, Any]:
    await batching.level_samples(mesh.base_url, DEFAULT_MODEL, 1, 4)  # warm the model
    rounds = []
    for _ in range(args.rounds):
        before = scrape(urls)
        started = time.perf_counter()
        samples = await batching.level_samples(
            mesh.base_url, DEFAULT_MODEL, streams, args.max_tokens, warm=False
        )
        wall = time.perf_counter() - started
        after = scrape(urls)
        failed = [s for s in samples if s.error or s.tokens != args.max_tokens]
        if failed:
            raise SystemExit(f"{len(failed)} of {streams} streams failed: {failed[0]}")
        ttft = [(s.first - s.start) * 1000 for s in samples]
        means = {"client": statistics.fmean(ttft)}
        for hop in HOPS:
            total = after[hop][0] - before[hop][0]
            count = after[hop][1] - before[hop][1]
            if count != streams:
                raise SystemExit(f"{hop} counted {count:.0f} first tokens, not {streams}")
            means[hop] = total / count * 1000
        rounds.append(
            {
                "tokens_per_s": streams * args.max_tokens / wall,
                "client_ttft_p50_ms": statistics.median(ttft),
                "mean_ttft_ms": means,
            }
        )
        print(f"{streams} streams: {json.dumps(rounds[-1])}", flush=True)
    return {
        "streams": streams,
        "rounds": rounds,
        "median_mean_ttft_ms": {
            hop: statistics.median(r["mean_ttft_ms"][hop] for r in rounds)
            for hop in ("client", *HOPS)
        },
    }


async def measure_all(
    mesh: Mesh, urls: dict[str, list[str]], args: argparse.Namespace
) -> list[dict[str, Any]]:
    return [await measure(mesh, urls, streams, args) for streams in args.streams]


def start_mesh(args: argparse.Namespace, state: Path) -> Mesh:
    settings = mesh_settings(state)
    local = batching.inference_local_fields(args.set)
    if args.gpu:
        from gpu_engine import gpu_mesh_settings

        slots = max(args.streams)
        settings = gpu_mesh_settings(settings, Path(args.gpu), slots, args.ctx, local=local)
    elif local:
        settings.inference_local = settings.inference_local.model_copy(update=local)
    if args.hop_replicas > 1:
        settings = with_hop_replicas(settings, args.hop_replicas)
    mesh = Mesh(settings, state / "slm.toml", state / "mesh.log")
    mesh.start()
    return mesh


def report(results: dict[str, Any], max_tokens: int) -> None:
    means = results["median_mean_ttft_ms"]
    print(
        f"\n{results['streams']} streams at once, {max_tokens} tokens each: "
        f"mean TTFT at each hop (median of {len(results['rounds'])} bursts)"
    )
    names = ("client", *HOPS)
    for outer, inner in zip(names, (*names[1:], None), strict=True):
        added = f"  (adds {means[outer] - means[inner]:7.1f} ms)" if inner else ""
        print(f"{outer:<10}{means[outer]:9.1f} ms{added}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--streams", type=int, nargs="+", default=[32])
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--gpu", metavar="GGUF", help="load this model on a CUDA GPU")
    parser.add_argument("--ctx", type=int, default=512, help="context a slot, with --gpu")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=JSON",
        help="an inference-local field, e.g. stream_interval_s=0",
    )
    parser.add_argument(
        "--hop-replicas",
        type=int,
        default=1,
        metavar="N",
        help="run the gateway and the Doorman as N processes each (gateway.replicas, "
        "doorman.endpoint.replicas)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "mesh_ttft.json")
    args = parser.parse_args()
    state = Path(tempfile.mkdtemp(prefix="slm-bench-ttft-"))
    mesh = start_mesh(args, state)
    try:
        urls = metrics_urls(mesh.settings)
        urls["engine"] = urls.pop("inference-local")
        levels = asyncio.run(measure_all(mesh, urls, args))
    finally:
        mesh.stop()
    results = {
        "max_tokens": args.max_tokens,
        "gpu": bool(args.gpu),
        "inference_local": args.set,
        "hop_replicas": args.hop_replicas,
        "levels": levels,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    for level in levels:
        report(level, args.max_tokens)
    print(f"\nJSON: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
