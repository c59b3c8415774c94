"""What the Doorman's result cache saves: one greedy chat answered by the engine (a miss) against
the same chat replayed from the cache (a hit), through a real Doorman in this process.

inference-local (the default model), the ledger and the Doorman run as gRPC servers in this
process on `make run`'s defaults, the result cache on (its in-process default). For each answer
length, a chat at temperature 0 is sent once (a miss: the engine generates it), then --hits
more times (each a hit: the stored stream replayed through rehydration and the output filter).
It reports the miss's latency and the hits' p50 and p95, from the request to the last event,
and writes JSON to --out.

    .venv/bin/python bench/result_cache.py
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
from prometheus_client import CollectorRegistry

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from helpers import DEFAULT_MODEL, mesh_settings, runtime

from doorman.config import CacheConfig
from slm.server import GrpcService
from slm.v1 import doorman_pb2, doorman_pb2_grpc, types_pb2

RESULTS = Path(__file__).parent / "results"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


async def timed(stub: doorman_pb2_grpc.DoormanServiceStub, request: Any) -> tuple[float, Any]:
    started = time.perf_counter()
    responses = [response async for response in stub.Chat(request)]
    return time.perf_counter() - started, responses[-1].end


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from doorman.app import build_app as doorman_app
    from inference_local.app import build_app as inference_app
    from ledger.app import build_app as ledger_app

    settings = mesh_settings(Path(tempfile.mkdtemp(prefix="slm-bench-cache-")))
    registries = [CollectorRegistry() for _ in range(3)]

    def port0(endpoint: Any) -> Any:
        return endpoint.model_copy(update={"port": 0, "metrics_port": 0})

    rows = []
    async with (
        GrpcService(
            "inference-local",
            inference_app(settings.inference_local, runtime(settings, registries[0])),
            port0(settings.inference_local.endpoint),
            settings.telemetry,
            registries[0],
        ) as inference,
        GrpcService(
            "ledger",
            ledger_app(settings.ledger, runtime(settings, registries[1])),
            port0(settings.ledger.endpoint),
            settings.telemetry,
            registries[1],
        ) as ledger,
    ):
        # The embedded default: the cache on, in process (the tests' settings turn it off).
        settings.doorman = settings.doorman.model_copy(
            update={
                "inference_local": f"127.0.0.1:{inference.port}",
                "ledger": f"127.0.0.1:{ledger.port}",
                "cache": CacheConfig(),
            }
        )
        doorman = doorman_app(settings.doorman, runtime(settings, registries[2]))
        async with (
            GrpcService(
                "doorman",
                doorman,
                port0(settings.doorman.endpoint),
                settings.telemetry,
                registries[2],
            ) as service,
            grpc.aio.insecure_channel(f"127.0.0.1:{service.port}") as channel,
        ):
            stub = doorman_pb2_grpc.DoormanServiceStub(channel)
            for index, max_tokens in enumerate(args.max_tokens):
                request = doorman_pb2.ChatRequest(
                    model=DEFAULT_MODEL,
                    messages=[
                        types_pb2.ChatMessage(
                            role=types_pb2.ROLE_USER, content=f"Tell story number {index}."
                        )
                    ],
                    sampling=types_pb2.SamplingParams(max_tokens=max_tokens, temperature=0),
                )
                miss, end = await timed(stub, request)
                assert not end.cache_hit, "the first request must reach the engine"
                await doorman.doorman.drain()  # the answer is kept in the background
                hits = []
                for _ in range(args.hits):
                    seconds, end = await timed(stub, request)
                    assert end.cache_hit, "a repeat must be a hit"
                    hits.append(seconds)
                row = {
                    "max_tokens": max_tokens,
                    "completion_tokens": end.usage.completion_tokens,
                    "miss_ms": miss * 1000,
                    "hit_p50_ms": statistics.median(hits) * 1000,
                    "hit_p95_ms": percentile(hits, 95) * 1000,
                }
                rows.append(row)
                print(
                    f"max_tokens {max_tokens:4d}  tokens {row['completion_tokens']:4d}  "
                    f"miss {row['miss_ms']:8.1f} ms  hit p50 {row['hit_p50_ms']:6.2f} ms  "
                    f"p95 {row['hit_p95_ms']:6.2f} ms  ({miss / statistics.median(hits):.0f}x)"
                )
    return {"machine": platform.machine(), "hits": args.hits, "rows": rows}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--max-tokens", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--hits", type=int, default=20)
    parser.add_argument("--out", type=Path, default=RESULTS / "result_cache.json")
    args = parser.parse_args()
    results = asyncio.run(run(args))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"\nJSON: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
