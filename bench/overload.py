"""Overload: N concurrent streams through Envoy at once; how fast the refused learn it.

The whole mesh on `make run`'s defaults (bench's helpers.Mesh) takes N streaming chat
completions started at the same moment through Envoy. Every request ends as one of:

- completed: 200, an SSE stream ending in `data: [DONE]` without an error event;
- refused: 429 or 503 with a Retry-After header, before any token;
- other: anything else (another status, a refusal without Retry-After, an error event in the
  stream, a dropped connection, or no answer within --deadline-s: a request that hung).

It reports the counts, the refusals' latency (request sent -> status line read) p50/p99/max,
the admitted streams' TTFT p50/p99, and whether the mesh answers a request afterwards. The
client is a minimal HTTP/1.1 one on asyncio streams (uvloop when installed), so that its own
cost stays small beside 600 connections on a 2-core machine; its latencies still include its
own event loop's turn over every connection. So it also reports Envoy's own view, from its
access log: when Envoy wrote each 429, counted from the burst's first request as Envoy saw it,
and how long each stayed in Envoy.

    .venv/bin/python bench/overload.py --streams 600 --max-tokens 32 --rounds 6
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import importlib.util
import json
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from helpers import DEFAULT_MODEL, Mesh, mesh_settings

RESULTS = Path(__file__).parent / "results"


@dataclass
class Outcome:
    kind: str  # completed | refused | other
    status: int
    detail: str
    # Seconds from the request's first byte sent to its status line, and to its first token.
    answered_s: float
    first_token_s: float | None
    # When the request left (time.perf_counter), to see how long the client took to send all.
    sent_at: float = 0.0


def percentile(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(0, math.ceil(q / 100 * len(ordered)) - 1)
    return ordered[rank]


def chat_body(max_tokens: int, index: int) -> bytes:
    return json.dumps(
        {
            "model": DEFAULT_MODEL,
            "messages": [{"role": "user", "content": f"Count from {index} upwards."}],
            "max_tokens": max_tokens,
            "stream": True,
            # Every admitted stream generates max_tokens tokens: end-of-generation is banned.
            "logit_bias": {"1": -100, "106": -100},
            "seed": index,
        }
    ).encode()


class Exchange(asyncio.Protocol):
    """One request on its own connection. Arrivals are only timestamped as they come (one
    call per read, a few microseconds); the response is parsed after the connection closes,
    so that 600 responses arriving together do not wait on each other's parsing."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.sent = 0.0
        self.raw = bytearray()
        # (arrival time, bytes received by then), per read.
        self.arrivals: list[tuple[float, int]] = []
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only alike.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.raw += data
        self.arrivals.append((time.perf_counter(), len(self.raw)))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)

    def send(self, request: bytes) -> None:
        assert self.transport is not None
        self.sent = time.perf_counter()
        self.transport.write(request)

    def arrived_by(self, offset: int) -> float:
        """Seconds from the request to the read that brought byte `offset`."""
        for at, received in self.arrivals:
            if received > offset:
                return at - self.sent
        return math.nan

    def outcome(self) -> Outcome:
        raw = bytes(self.raw)
        head, sep, body = raw.partition(b"\r\n\r\n")
        if not self.arrivals or not sep:
            return Outcome("other", 0, "closed before a response", math.nan, None, self.sent)
        answered = self.arrivals[0][0] - self.sent
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {
            k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:])
        }
        if status != 200:
            detail = _error_code(body)
            if status in (429, 503) and "retry-after" in headers:
                return Outcome("refused", status, detail, answered, None, self.sent)
            return Outcome("other", status, f"{detail} (retry-after missing)", answered, None)
        data, raw_offset = dechunk(body, len(head) + len(sep))
        first: float | None = None
        offset = 0
        for line in data.split(b"\n"):
            at = offset
            offset += len(line) + 1
            if not line.startswith(b"data: "):
                continue
            payload = line[6:].strip()
            if payload == b"[DONE]":
                return Outcome("completed", 200, "", answered, first, self.sent)
            event = json.loads(payload)
            if "error" in event:
                detail = f"error event {_error_code(payload)}"
                return Outcome("other", 200, detail, answered, first, self.sent)
            if first is None and any(c.get("delta", {}).get("content") for c in event["choices"]):
                first = self.arrived_by(raw_offset(at))
        return Outcome("other", 200, "stream ended without [DONE]", answered, first, self.sent)


def dechunk(body: bytes, base: int) -> tuple[bytes, Callable[[int], int]]:
    """The data of a chunked body, and a map from an offset in it to the offset in the raw
    response (`base`: where the body starts), to time an event by the read that brought it."""
    pieces: list[bytes] = []
    starts: list[tuple[int, int]] = []  # (offset in data, offset in raw)
    position, length = 0, 0
    while position < len(body):
        end = body.find(b"\r\n", position)
        if end < 0:
            break
        size = int(body[position:end].split(b";")[0] or b"0", 16)
        if size == 0:
            break
        start = end + 2
        starts.append((length, base + start))
        pieces.append(body[start : start + size])
        length += size
        position = start + size + 2

    def raw_offset(offset: int) -> int:
        index = bisect.bisect_right(starts, (offset, math.inf)) - 1
        data_start, raw_start = starts[max(index, 0)]
        return raw_start + offset - data_start

    return b"".join(pieces), raw_offset


def http_request(host: str, port: int, body: bytes) -> bytes:
    return (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}:{port}\r\n"
        "Content-Type: application/json\r\nAccept: text/event-stream\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode() + body


def _error_code(raw: bytes) -> str:
    # Chunked or not, the JSON object lies between the first "{" and the last "}".
    start, end = raw.find(b"{"), raw.rfind(b"}")
    try:
        error = json.loads(raw[start : end + 1])["error"]
        code = str(error.get("code") or error.get("type"))
        # Who refused: Envoy's and the gateway's overload messages name their limits.
        message = str(error.get("message", ""))
        if message.startswith("The mesh is serving"):
            return f"{code} (envoy)"
        if message.startswith("The gateway is serving"):
            return f"{code} (gateway)"
        return code
    except (ValueError, KeyError, TypeError):
        return raw[:80].decode("latin-1", "replace")


async def connect(host: str, port: int) -> Exchange:
    transport, exchange = await asyncio.get_running_loop().create_connection(Exchange, host, port)
    # uvloop may call connection_made after create_connection has returned.
    exchange.transport = transport
    return exchange


async def finish(exchange: Exchange, deadline_s: float) -> Outcome:
    try:
        await asyncio.wait_for(asyncio.shield(exchange.closed), deadline_s)
    except TimeoutError:
        if exchange.transport is not None:
            exchange.transport.abort()
        return Outcome("other", 0, "hung past the deadline", deadline_s, None, exchange.sent)
    return exchange.outcome()


async def single(host: str, port: int, body: bytes, deadline_s: float) -> Outcome:
    try:
        exchange = await connect(host, port)
    except OSError as error:
        return Outcome("other", 0, type(error).__name__, math.nan, None)
    exchange.send(http_request(host, port, body))
    return await finish(exchange, deadline_s)


async def burst(
    host: str, port: int, streams: int, max_tokens: int, deadline_s: float
) -> list[Outcome]:
    """`streams` requests sent together. Every connection is opened first (Envoy accepts them
    without asking anything upstream), so that the requests leave at once and the client's own
    connection setup is not part of any latency."""
    exchanges = await asyncio.gather(*(connect(host, port) for _ in range(streams)))
    requests = [http_request(host, port, chat_body(max_tokens, i)) for i in range(streams)]
    # Each waiter is made and parked on its connection before the clock starts: set up after
    # the sends, 600 of them held the event loop for tens of ms before it read any answer.
    finished = [asyncio.ensure_future(finish(e, deadline_s)) for e in exchanges]
    await asyncio.sleep(0)
    for exchange, request in zip(exchanges, requests, strict=True):
        exchange.send(request)
    return list(await asyncio.gather(*finished))


def summarise(outcomes: list[Outcome], wall_s: float) -> dict[str, Any]:
    refused = [o.answered_s * 1000 for o in outcomes if o.kind == "refused"]
    ttft = [o.first_token_s * 1000 for o in outcomes if o.kind == "completed" and o.first_token_s]
    other: dict[str, int] = {}
    for o in outcomes:
        if o.kind == "other":
            key = f"{o.status} {o.detail}"
            other[key] = other.get(key, 0) + 1
    statuses: dict[str, int] = {}
    for o in outcomes:
        if o.kind == "refused":
            key = f"{o.status} {o.detail}"
            statuses[key] = statuses.get(key, 0) + 1
    sent = [o.sent_at for o in outcomes if o.sent_at]
    return {
        # How long the client took to send every request of the burst: the floor under its
        # latencies, since each is timed by the same event loop.
        "send_spread_ms": (max(sent) - min(sent)) * 1000 if sent else math.nan,
        "completed": sum(o.kind == "completed" for o in outcomes),
        "refused": len(refused),
        "other": sum(o.kind == "other" for o in outcomes),
        "refusals_by_status_and_code": statuses,
        "other_by_kind": other,
        "refusal_ms_p50": statistics.median(refused) if refused else math.nan,
        "refusal_ms_p99": percentile(refused, 99),
        "refusal_ms_max": max(refused, default=math.nan),
        "ttft_ms_p50": statistics.median(ttft) if ttft else math.nan,
        "ttft_ms_p99": percentile(ttft, 99),
        "wall_s": wall_s,
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    state = Path(tempfile.mkdtemp(prefix="slm-bench-overload-"))
    settings = mesh_settings(state)
    mesh = Mesh(settings, state / "slm.toml", state / "mesh.log")
    mesh.start()
    host, port = "127.0.0.1", settings.envoy.port
    rounds: list[dict[str, Any]] = []
    try:
        warm = await single(host, port, chat_body(4, 0), args.deadline_s)
        if warm.kind != "completed":
            raise RuntimeError(f"the mesh did not answer a warm-up request: {warm}")
        windows: list[tuple[float, float]] = []
        for _ in range(args.rounds):
            started, wall_started = time.perf_counter(), time.time()
            outcomes = await burst(host, port, args.streams, args.max_tokens, args.deadline_s)
            result = summarise(outcomes, time.perf_counter() - started)
            windows.append((wall_started, time.time()))
            after = await single(host, port, chat_body(4, 1), args.deadline_s)
            result["answers_afterwards"] = after.kind == "completed"
            rounds.append(result)
            report_round(result)
            if args.raw:
                result["outcomes"] = [asdict(o) for o in outcomes]
    finally:
        mesh.stop()
    # Envoy's own view of its refusals, from its access log (now complete in the mesh's log).
    access = envoy_access_log(mesh.log_path)
    print("\nEnvoy's own timing of its 429s (access log), from the burst's first request:")
    for result, window in zip(rounds, windows, strict=True):
        result.update(envoy_refusals(access, *window))
        print(
            f"  refusals written p50 {result['envoy_refusal_sent_ms_p50']:.1f} ms "
            f"p99 {result['envoy_refusal_sent_ms_p99']:.1f} ms; "
            f"time inside Envoy p99 {result['envoy_refusal_duration_ms_p99']:.0f} ms "
            f"({result['envoy_refusals']} logged)"
        )
    return {
        "streams": args.streams,
        "max_tokens": args.max_tokens,
        "deadline_s": args.deadline_s,
        "envoy": settings.envoy.model_dump(mode="json"),
        "gateway_limits": {
            k: v for k, v in settings.gateway.model_dump(mode="json").items() if "max" in k
        },
        "inference_local_max_queue": settings.inference_local.max_queue,
        "rounds": rounds,
    }


def envoy_access_log(path: Path) -> list[dict[str, Any]]:
    """The generation routes' entries of Envoy's access log (JSON lines in the mesh's log)."""
    entries = []
    for line in path.read_text(errors="replace").splitlines():
        if not line.startswith("{") or '"route"' not in line:
            continue
        with contextlib.suppress(ValueError):
            entry = json.loads(line)
            if str(entry.get("route", "")).startswith("generation"):
                entries.append(entry)
    return entries


def envoy_refusals(access: list[dict[str, Any]], start: float, end: float) -> dict[str, Any]:
    """Envoy's 429s of the burst sent between `start` and `end` (wall clock): when Envoy wrote
    each, counted from the burst's first request as Envoy saw it, and how long each stayed in
    Envoy. The client's own latencies add its event loop's turn over every connection."""

    def at(entry: dict[str, Any]) -> float:
        stamp = datetime.strptime(entry["ts"], "%Y-%m-%dT%H:%M:%S.%fZ")
        return stamp.replace(tzinfo=UTC).timestamp()

    burst = [e for e in access if start - 0.001 <= at(e) <= end]
    if not burst:
        return {
            "envoy_refusals": 0,
            "envoy_refusal_sent_ms_p50": math.nan,
            "envoy_refusal_sent_ms_p99": math.nan,
            "envoy_refusal_duration_ms_p99": math.nan,
        }
    first = min(at(e) for e in burst)
    refused = [e for e in burst if e.get("status") == 429]
    sent = [(at(e) - first) * 1000 + float(e.get("duration_ms") or 0) for e in refused]
    inside = [float(e.get("duration_ms") or 0) for e in refused]
    return {
        "envoy_refusals": len(refused),
        "envoy_refusal_sent_ms_p50": statistics.median(sent) if sent else math.nan,
        "envoy_refusal_sent_ms_p99": percentile(sent, 99),
        "envoy_refusal_duration_ms_p99": percentile(inside, 99),
    }


def report_round(r: dict[str, Any]) -> None:
    print(
        f"completed {r['completed']}  refused {r['refused']}  other {r['other']}  "
        f"refusal p50 {r['refusal_ms_p50']:.1f} ms p99 {r['refusal_ms_p99']:.1f} ms "
        f"max {r['refusal_ms_max']:.1f} ms  TTFT p50 {r['ttft_ms_p50']:.0f} ms "
        f"p99 {r['ttft_ms_p99']:.0f} ms  wall {r['wall_s']:.1f} s  "
        f"(requests sent within {r['send_spread_ms']:.1f} ms)  "
        f"answers afterwards: {r['answers_afterwards']}"
    )
    if r["refusals_by_status_and_code"]:
        print(f"  refusals: {r['refusals_by_status_and_code']}")
    if r["other_by_kind"]:
        print(f"  other: {r['other_by_kind']}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--streams", type=int, default=600)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=1)
    # A request still unanswered after this long counts as hung.
    parser.add_argument("--deadline-s", type=float, default=600.0)
    parser.add_argument("--raw", action="store_true", help="keep every request's outcome")
    parser.add_argument("--out", type=Path, default=RESULTS / "overload.json")
    args = parser.parse_args()
    if importlib.util.find_spec("uvloop"):
        import uvloop

        # The client's own event loop is part of every latency it measures: the faster one.
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            results = runner.run(run(args))
    else:
        results = asyncio.run(run(args))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"\nJSON: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
