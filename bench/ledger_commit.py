"""What a durable ledger record costs a request: the Doorman's commit latency and appends/s.

A Doorman sends a stream's final event only once the request's ledger record is durable, so the
latency each request gains is exactly the time `LedgerSink.commit` takes. This drives the
Doorman's own LedgerSink against `slm serve ledger` as a separate process (SQLite, WAL,
synchronous=FULL: one fsync per transaction) from 1 and from 16 concurrent requests, each
committing its next record as soon as the last is durable, and reports commit latency (p50,
p99) and records made durable per second:

- group commit: the default sink; what accumulates while a batch is in flight goes in one
  AppendBatch (one transaction, one fsync);
- one record per Append: the same sink with max_batch=1, one transaction per record (what
  appends cost without group commit);
- spool, ledger down: the ledger unreachable, records fsync'd to the Doorman's spool, a batch
  per fsync.

    .venv/bin/python bench/ledger_commit.py              # --seconds 5 per run
    .venv/bin/python bench/ledger_commit.py --backend postgresql   # a local PostgreSQL server
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from prometheus_client import CollectorRegistry

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from helpers import free_port, mesh_settings, to_toml
from postgres_server import PostgresServer, postgres_bindir

from doorman.ledger_sink import MAX_BATCH, LedgerSink
from slm.v1 import ledger_pb2, ledger_pb2_grpc, types_pb2

RESULTS = Path(__file__).parent / "results"


@dataclass(frozen=True)
class Result:
    mode: str
    concurrency: int
    records: int
    seconds: float
    appends_per_s: float
    p50_ms: float
    p99_ms: float
    rpcs: int


def entry(n: int) -> ledger_pb2.LedgerEntry:
    """A record shaped like the Doorman's for a short chat request."""
    now = Timestamp()
    now.GetCurrentTime()
    return ledger_pb2.LedgerEntry(
        request_id=f"bench-{n:08d}",
        time=now,
        tenant="acme",
        key_id="key-1",
        model="gemma-3-270m",
        tier=types_pb2.TIER_LOCAL,
        upstream="127.0.0.1:50052",
        prompt_tokens=12,
        completion_tokens=64,
        ttft_ms=21.5,
        latency_ms=480.25,
        finish_reason=types_pb2.FINISH_REASON_STOP,
        operation="Chat",
    )


class CountCalls(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    """Counts the RPCs the sink makes."""

    def __init__(self) -> None:
        self.calls = 0

    async def intercept_unary_unary(
        self, continuation: object, client_call_details: object, request: object
    ) -> object:
        self.calls += 1
        return await continuation(client_call_details, request)  # type: ignore[operator]


async def run(
    mode: str, address: str, spool: Path, concurrency: int, seconds: float, first: int
) -> Result:
    counter = CountCalls()
    async with grpc.aio.insecure_channel(address, interceptors=[counter]) as channel:
        sink = LedgerSink(
            ledger_pb2_grpc.LedgerServiceStub(channel),
            "spool",
            spool,
            CollectorRegistry(),
            max_batch=1 if mode == "one record per Append" else MAX_BATCH,
        )
        await sink.start()
        if mode.startswith("spool"):
            # The first commit finds the ledger down; the rest go straight to the spool.
            await sink.commit(entry(first - 1))
            assert not sink.available
        latencies: list[float] = []
        counter.calls = 0
        next_id = first
        stop_at = time.perf_counter() + seconds

        async def request() -> None:
            nonlocal next_id
            while time.perf_counter() < stop_at:
                n, next_id = next_id, next_id + 1
                started = time.perf_counter()
                await sink.commit(entry(n))
                latencies.append(time.perf_counter() - started)

        began = time.perf_counter()
        await asyncio.gather(*(request() for _ in range(concurrency)))
        elapsed = time.perf_counter() - began
        rpcs = counter.calls
        await sink.drain(timeout_s=1)
    latencies.sort()
    return Result(
        mode=mode,
        concurrency=concurrency,
        records=len(latencies),
        seconds=round(elapsed, 3),
        appends_per_s=round(len(latencies) / elapsed, 1),
        p50_ms=round(statistics.median(latencies) * 1000, 3),
        p99_ms=round(latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000, 3),
        rpcs=rpcs,
    )


def start_ledger(state: Path, postgres_dsn: str) -> tuple[subprocess.Popen[bytes], str]:
    settings = mesh_settings(state)
    if postgres_dsn:
        settings.ledger.backend = "postgresql"
        settings.ledger.postgres_dsn = postgres_dsn
    config = state / "slm.toml"
    config.write_text(to_toml(settings))
    process = subprocess.Popen(
        [sys.executable, "-m", "mesh.cli", "--config", str(config), "serve", "ledger"],
        stdout=subprocess.DEVNULL,
        stderr=(state / "ledger.log").open("wb"),
        stdin=subprocess.DEVNULL,
        env={**os.environ, "SLM_CONFIG": ""},
    )
    return process, settings.ledger.endpoint.address


async def verify(address: str) -> ledger_pb2.VerifyResponse:
    async with grpc.aio.insecure_channel(address) as channel:
        verdict: ledger_pb2.VerifyResponse = await ledger_pb2_grpc.LedgerServiceStub(
            channel
        ).Verify(ledger_pb2.VerifyRequest(), wait_for_ready=True, timeout=120)
    return verdict


async def measure(backend: str, seconds: float) -> tuple[list[Result], ledger_pb2.VerifyResponse]:
    """Every run against one ledger process; then Verify of the chain they made."""
    results: list[Result] = []
    postgres: PostgresServer | None = None
    dsn = ""
    if backend == "postgresql":
        if postgres_bindir() is None:
            raise SystemExit("PostgreSQL is not installed: run `make deps`")
        postgres = PostgresServer()
        postgres.start()
        dsn = await postgres.new_database()
    with tempfile.TemporaryDirectory(prefix="ledger-bench-") as tmp:
        state = Path(tmp)
        ledger, address = start_ledger(state, dsn)
        try:
            await verify(address)  # waits until the ledger serves
            first = 1
            for mode in ("group commit", "one record per Append", "spool, ledger down"):
                target = f"127.0.0.1:{free_port()}" if mode.startswith("spool") else address
                for concurrency in (1, 16):
                    spool = state / f"spool-{len(results)}"
                    result = await run(mode, target, spool, concurrency, seconds, first)
                    first += result.records + 1
                    results.append(result)
            verdict = await verify(address)
        finally:
            ledger.send_signal(signal.SIGTERM)
            ledger.wait(timeout=60)
            if postgres is not None:
                postgres.stop()
    return results, verdict


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each run")
    parser.add_argument("--backend", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    out: Path = args.out or RESULTS / f"ledger_commit.{args.backend}.json"
    # The spool runs take the ledger down on purpose; the sink's error lines say only that.
    logging.getLogger("doorman.ledger_sink").setLevel(logging.CRITICAL)
    results, verdict = asyncio.run(measure(args.backend, args.seconds))
    print(f"{'mode':<24} {'streams':>7} {'records':>8} {'appends/s':>10} {'p50 ms':>8} "
          f"{'p99 ms':>8} {'RPCs':>7}")  # fmt: skip
    for r in results:
        print(
            f"{r.mode:<24} {r.concurrency:>7} {r.records:>8} {r.appends_per_s:>10.1f} "
            f"{r.p50_ms:>8.2f} {r.p99_ms:>8.2f} {r.rpcs:>7}"
        )
    print(f"backend: {args.backend}")
    print(f"ledger after the runs: intact={verdict.intact}, {verdict.records_checked} records")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
                "backend": (
                    "sqlite (WAL, synchronous=FULL)"
                    if args.backend == "sqlite"
                    else "postgresql (synchronous_commit=on, local server)"
                )
                + ", slm serve ledger as its own process",
                "seconds_per_run": args.seconds,
                "results": [asdict(r) for r in results],
                "chain_intact": verdict.intact,
                "records": verdict.records_checked,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
