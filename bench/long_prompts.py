"""What long prompts do to the streams already running: their gaps between tokens.

The whole mesh on `make run`'s defaults streams --streams completions through Envoy (bench/
batching.py's requests and client, --max-tokens each). In every other round, a client beside
them also sends --long requests of --chars characters each (a prompt about the size of the
1 MiB body Envoy admits), one after another with a pause between; the default model's context
refuses them with a 400 once they are tokenised, so they cost the mesh their reading and
tokenising, never a decode. Reported per round kind (median over --rounds rounds of each): the
longest gap between two tokens of a running stream, how many gaps exceed 300 ms, and the p99
and p50 gaps, past each stream's first few tokens (its start overlaps the other streams'
prefill), and how long a long request took to be refused.

    .venv/bin/python bench/long_prompts.py --rounds 2
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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from batching import level_samples, percentile
from helpers import DEFAULT_MODEL, Mesh, mesh_settings

RESULTS = Path(__file__).parent / "results"
# Gaps before a stream's this-many-th token are left out: they include the prefill of the
# streams that started with it.
SKIP_TOKENS = 5
LONG_GAP_S = 0.3


async def long_requests(base_url: str, count: int, chars: int, pause_s: float) -> list[float]:
    """Send `count` prompts of `chars` characters one after another; each one's seconds."""
    text = ("lorem ipsum dolor sit amet " * (chars // 27 + 1))[:chars]
    took = []
    async with httpx.AsyncClient(timeout=300) as client:
        for _ in range(count):
            started = time.perf_counter()
            response = await client.post(
                f"{base_url}/v1/completions",
                json={"model": DEFAULT_MODEL, "prompt": text, "max_tokens": 1},
            )
            took.append(time.perf_counter() - started)
            if response.status_code != 400 or "context" not in response.text:
                raise RuntimeError(f"a long prompt got {response.status_code}: {response.text}")
            await asyncio.sleep(pause_s)
    return took


async def one_round(args: argparse.Namespace, base_url: str, long: bool) -> dict[str, Any]:
    streaming = asyncio.ensure_future(
        level_samples(base_url, DEFAULT_MODEL, args.streams, args.max_tokens, warm=False)
    )
    took = await long_requests(base_url, args.long, args.chars, args.pause) if long else []
    samples = await streaming
    failed = [s.error for s in samples if s.error]
    if failed:
        raise RuntimeError(f"streams failed: {failed}")
    gaps = [g for s in samples for g in s.gaps[SKIP_TOKENS:]]
    return {
        "long_requests": long,
        "max_gap_ms": max(gaps) * 1000,
        "gaps_over_300ms": sum(g > LONG_GAP_S for g in gaps),
        "p99_gap_ms": percentile(gaps, 99) * 1000,
        "p50_gap_ms": percentile(gaps, 50) * 1000,
        "long_request_s": took,
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    state = Path(tempfile.mkdtemp(prefix="slm-bench-long-"))
    settings = mesh_settings(state)
    mesh = Mesh(settings, state / "slm.toml", state / "mesh.log")
    mesh.start()
    rounds = []
    try:
        await one_round(args, mesh.base_url, False)  # warm
        for _ in range(args.rounds):
            for long in (False, True):
                rounds.append(await one_round(args, mesh.base_url, long))
                print(json.dumps(rounds[-1]))
    finally:
        mesh.stop()
    summary = {}
    for long in (False, True):
        kind = [r for r in rounds if r["long_requests"] is long]
        summary["with long prompts" if long else "alone"] = {
            key: statistics.median(r[key] for r in kind)
            for key in ("max_gap_ms", "gaps_over_300ms", "p99_gap_ms", "p50_gap_ms")
        } | {
            "long_request_s_p50": (
                statistics.median(s for r in kind for s in r["long_request_s"]) if long else None
            )
        }
    return {
        "streams": args.streams,
        "max_tokens": args.max_tokens,
        "long_requests_per_round": args.long,
        "chars": args.chars,
        "rounds": rounds,
        "median": summary,
    }


def report(results: dict[str, Any]) -> None:
    print(
        f"\n{results['streams']} streams x {results['max_tokens']} tokens; beside them "
        f"{results['long_requests_per_round']} prompts of {results['chars']:,} characters "
        f"(median of {len(results['rounds']) // 2} rounds each)"
    )
    heads = ("max gap ms", 12), ("gaps > 300 ms", 15), ("p99 ms", 9), ("p50 ms", 9)
    print(f"{'':<20}" + "".join(f"{h:>{w}}" for h, w in heads) + f"{'refused in s':>14}")
    for kind, row in results["median"].items():
        refused = row["long_request_s_p50"]
        print(
            f"{kind:<20}{row['max_gap_ms']:>12.1f}{row['gaps_over_300ms']:>15.0f}"
            f"{row['p99_gap_ms']:>9.1f}{row['p50_gap_ms']:>9.1f}"
            f"{'' if refused is None else f'{refused:.2f}':>14}"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=160)
    parser.add_argument("--long", type=int, default=6, help="long prompts a round")
    parser.add_argument("--chars", type=int, default=900_000)
    parser.add_argument("--pause", type=float, default=0.3, help="seconds between long prompts")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS / "long_prompts.json")
    args = parser.parse_args()
    results = asyncio.run(run(args))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    report(results)
    print(f"\nJSON: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
