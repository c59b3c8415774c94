"""The mesh's CPU cost per streamed token, process by process, beside the in-process engine.

The whole mesh on `make run`'s defaults takes N concurrent streaming completions through Envoy
(/v1/completions, a ~120-token prompt, max_tokens tokens each, end-of-generation banned); each
process's CPU time (user + system, from /proc) over the load is divided by the tokens streamed:
Envoy, the gateway, the Doorman, and inference-local split into its decode (the `slm-decode`
thread and llama.cpp's OpenMP workers, which it starts and which inherit its name), its event
loop (the servicer; the process's main thread) and the rest (samplers, gRPC's threads). The
same load then runs on inference-local's Engine in this process, so the mesh's throughput is
reported as a ratio of the engine's.

    .venv/bin/python bench/mesh_cpu.py --streams 16 --rounds 3
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
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from batching import direct_engine, level
from helpers import DEFAULT_MODEL, Mesh, mesh_settings

RESULTS = Path(__file__).parent / "results"
TICK = os.sysconf("SC_CLK_TCK")
# The load's client (httpx, SSE parsing): not the mesh's, but it takes the same cores, as it
# does beside llama-server in bench/batching.py. It runs on this process's event-loop thread,
# whose CPU time alone is counted: the in-process engine's threads (its load-time work still
# running during the first round) are not the client's.
CLIENT = "client (this process: httpx, SSE and JSON parsing)"


def cpu_seconds(stat_path: Path) -> float:
    """utime + stime of a /proc stat file, in seconds."""
    fields = stat_path.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        path = task / "children"
        if path.exists():
            found += [int(c) for c in path.read_text().split()]
    return found


def mesh_processes(up_pid: int) -> dict[str, int]:
    """`slm up`'s children by role: the service a `serve NAME` runs, or envoy."""
    roles = {}
    for pid in children(up_pid):
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        words = [a.decode() for a in argv if a]
        if "serve" in words:
            roles[words[words.index("serve") + 1]] = pid
        elif any("envoy" in w for w in words[:1]):
            roles["envoy"] = pid
    return roles


def snapshot(roles: dict[str, int]) -> dict[str, float]:
    """CPU seconds so far of every role (inference-local by thread group) and of the client;
    called on the client's thread."""
    taken: dict[str, float] = {CLIENT: time.thread_time()}
    for role, pid in roles.items():
        if role != "inference-local":
            taken[role] = cpu_seconds(Path(f"/proc/{pid}/stat"))
            continue
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                name = (task / "comm").read_text().strip()
                seconds = cpu_seconds(task / "stat")
            except FileNotFoundError:
                continue  # the thread ended
            group = (
                "inference-local: decode (thread + llama.cpp workers)"
                if name == "slm-decode"
                else "inference-local: event loop (servicer)"
                if int(task.name) == pid
                else "inference-local: samplers, gRPC threads"
            )
            taken[group] = taken.get(group, 0.0) + seconds
    return taken


async def run(args: argparse.Namespace) -> dict[str, Any]:
    state = Path(tempfile.mkdtemp(prefix="slm-bench-cpu-"))
    settings = mesh_settings(state)
    mesh = Mesh(settings, state / "slm.toml", state / "mesh.log")
    mesh.start()
    rounds: list[dict[str, Any]] = []
    try:
        assert mesh.process is not None
        roles = mesh_processes(mesh.process.pid)
        await level(mesh.base_url, DEFAULT_MODEL, args.streams, args.max_tokens)  # warm
        async with direct_engine(settings.inference_local) as engine:
            for _ in range(args.rounds):
                before, started = snapshot(roles), time.perf_counter()
                through = await level(mesh.base_url, DEFAULT_MODEL, args.streams, args.max_tokens)
                wall = time.perf_counter() - started
                after = snapshot(roles)
                tokens = args.streams * args.max_tokens
                cpu = {k: after[k] - before.get(k, 0.0) for k in after}
                alone = await level(engine, DEFAULT_MODEL, args.streams, args.max_tokens)
                rounds.append(
                    {
                        "mesh_tokens_per_s": through["tokens_per_s"],
                        "engine_tokens_per_s": alone["tokens_per_s"],
                        "wall_s": wall,
                        "cpu_s_per_1k_tokens": {k: v / tokens * 1000 for k, v in cpu.items()},
                    }
                )
    finally:
        mesh.stop()
    keys = rounds[0]["cpu_s_per_1k_tokens"]
    return {
        "streams": args.streams,
        "max_tokens": args.max_tokens,
        "cpu_count": os.cpu_count(),
        "rounds": rounds,
        "median": {
            "mesh_tokens_per_s": statistics.median(r["mesh_tokens_per_s"] for r in rounds),
            "engine_tokens_per_s": statistics.median(r["engine_tokens_per_s"] for r in rounds),
            "cpu_s_per_1k_tokens": {
                k: statistics.median(r["cpu_s_per_1k_tokens"].get(k, 0.0) for r in rounds)
                for k in keys
            },
        },
    }


def report(results: dict[str, Any]) -> None:
    median = results["median"]
    print(
        f"\n{results['streams']} streams x {results['max_tokens']} tokens, "
        f"median of {len(results['rounds'])} rounds"
    )
    print(f"{'process':<52}{'CPU s / 1k tokens':>18}")
    for name, value in sorted(median["cpu_s_per_1k_tokens"].items(), key=lambda kv: -kv[1]):
        print(f"{name:<52}{value:>18.3f}")
    hops = sum(
        v
        for k, v in median["cpu_s_per_1k_tokens"].items()
        if not k.startswith("inference-local") and k != CLIENT
    )
    print(f"{'hops (Envoy + gateway + Doorman + others)':<52}{hops:>18.3f}")
    ratio = median["mesh_tokens_per_s"] / median["engine_tokens_per_s"]
    print(
        f"mesh {median['mesh_tokens_per_s']:.1f} tok/s, engine in-process "
        f"{median['engine_tokens_per_s']:.1f} tok/s: ratio {ratio:.2f}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS / "mesh_cpu.json")
    args = parser.parse_args()
    results = asyncio.run(run(args))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    report(results)
    print(f"\nJSON: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
