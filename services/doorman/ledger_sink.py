"""Delivers the Doorman's ledger records in order, through ledger outages: fail closed or spool."""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import contextlib
import itertools
import logging
import os
import random
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import grpc
from google.protobuf.message import DecodeError
from opentelemetry import context as otel_context
from opentelemetry import trace
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from slm.errors import Internal, Unavailable
from slm.v1 import ledger_pb2, ledger_pb2_grpc

log = logging.getLogger(__name__)

LedgerMode = Literal["fail_closed", "spool"]

# Records per AppendBatch (the ledger takes up to 1000).
MAX_BATCH = 500

# Codes that say "the ledger cannot take it now"; anything else is the ledger refusing the
# record itself, which no retry will change.
TRANSIENT = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.UNKNOWN,
    }
)


@dataclass(frozen=True)
class Backoff:
    """Delays between attempts to reach a ledger that is down: exponential, with full jitter."""

    initial_s: float = 0.2
    max_s: float = 5.0

    def delay(self, failures: int) -> float:
        ceiling = min(self.max_s, self.initial_s * 2 ** max(0, failures - 1))
        return random.uniform(self.initial_s / 2, ceiling)


class SinkMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.available = Gauge(
            "slm_doorman_ledger_available",
            "1 while the last attempt to reach the ledger succeeded.",
            registry=registry,
        )
        self.backlog = Gauge(
            "slm_doorman_ledger_backlog",
            "Records not yet acknowledged by the ledger (in memory and in the spool).",
            registry=registry,
        )
        self.spooled = Counter(
            "slm_doorman_ledger_spooled", "Records written to the local spool.", registry=registry
        )
        self.rejected = Counter(
            "slm_doorman_ledger_rejected",
            "Records the ledger refused for good (not retried).",
            registry=registry,
        )
        self.commit = Histogram(
            "slm_doorman_ledger_commit_seconds",
            "Time a request's final event waited for its record to be durable.",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5),
            registry=registry,
        )
        self.batch = Histogram(
            "slm_doorman_ledger_batch_records",
            "Records per call to the ledger (group commit).",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 500),
            registry=registry,
        )


class Spool:
    """An append-only file of records, fsync'd, and the offset up to which it was replayed.

    One line per record: base64 of the serialised LedgerEntry. A last line without its newline
    is a write torn by a crash before its fsync returned, so it was never counted as kept; it
    is cut off when the spool is opened.
    """

    def __init__(self, path: Path) -> None:
        self.path = path.expanduser()
        self._offset_path = self.path.with_name(self.path.name + ".offset")
        self._offset = 0
        # Records after the offset, oldest first, with their size in the file.
        self.pending: collections.deque[tuple[ledger_pb2.LedgerEntry, int]] = collections.deque()
        # append and advance run in worker threads; a shutdown may overlap the two.
        self._lock = threading.Lock()

    def load(self) -> None:
        if not self.path.exists():
            return
        with contextlib.suppress(FileNotFoundError, ValueError):
            self._offset = int(self._offset_path.read_text())
        data = self.path.read_bytes()
        complete = data.rfind(b"\n") + 1
        if complete < len(data):
            log.warning(
                "ledger spool: cutting off a torn last record", extra={"path": str(self.path)}
            )
            with self.path.open("r+b") as spool:
                spool.truncate(complete)
                os.fsync(spool.fileno())
        for line in data[self._offset : complete].splitlines(keepends=True):
            try:
                entry = ledger_pb2.LedgerEntry.FromString(
                    base64.b64decode(line.rstrip(b"\n"), validate=True)
                )
            except (binascii.Error, DecodeError):
                log.error("ledger spool: skipping an unreadable record")
                # Replaying the record before it also steps over this line.
                if self.pending:
                    previous, size = self.pending.pop()
                    self.pending.append((previous, size + len(line)))
                else:
                    self._offset += len(line)
            else:
                self.pending.append((entry, len(line)))

    def append(self, entries: Iterable[ledger_pb2.LedgerEntry]) -> None:
        """Write and fsync: when this returns, the records survive a crash of the Doorman."""
        lines = [(e, base64.b64encode(e.SerializeToString()) + b"\n") for e in entries]
        with self._lock:
            self._append(lines)

    def _append(self, lines: list[tuple[ledger_pb2.LedgerEntry, bytes]]) -> None:
        created = not self.path.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("ab") as spool:
            spool.write(b"".join(line for _, line in lines))
            spool.flush()
            os.fsync(spool.fileno())
        if created:
            _fsync_dir(self.path.parent)
        self.pending.extend((e, len(line)) for e, line in lines)

    def advance(self, count: int = 1) -> None:
        """The `count` oldest pending records are in the ledger: never replay them again."""
        with self._lock:
            self._advance(count)

    def _advance(self, count: int) -> None:
        for _ in range(count):
            _, size = self.pending.popleft()
            self._offset += size
        if not self.pending:
            # Everything replayed: start an empty file rather than growing one forever.
            with self.path.open("r+b") as spool:
                spool.truncate(0)
                os.fsync(spool.fileno())
            self._offset = 0
            self._offset_path.unlink(missing_ok=True)
            return
        temporary = self._offset_path.with_suffix(".tmp")
        with temporary.open("w") as out:
            out.write(str(self._offset))
            out.flush()
            os.fsync(out.fileno())
        temporary.replace(self._offset_path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(eq=False)
class _Held:
    """A record on its way to the ledger, the trace context it was made in, and the future of
    the request that waits for it to be durable (None: nobody waits, e.g. the client left)."""

    entry: ledger_pb2.LedgerEntry
    context: otel_context.Context | None = None
    done: asyncio.Future[None] | None = None

    def resolve(self, error: BaseException | None = None) -> None:
        if self.done is None or self.done.done():
            return  # nobody waits, or the request was cancelled meanwhile
        if error is None:
            self.done.set_result(None)
        else:
            self.done.set_exception(error)


class LedgerSink:
    """Makes each record durable before its request may end, in order, through ledger outages.

    `commit` returns once the ledger acknowledged the record or, while the ledger cannot be
    reached, once the record is fsync'd to the spool; either way it survives a kill -9 of the
    Doorman. Group commit: one worker sends whatever accumulated while the previous batch was
    in flight as one AppendBatch (one transaction, one fsync in the ledger), and spools a
    batch with one fsync. While the ledger is down, `fail_closed` makes `admit` refuse new
    requests and `spool` keeps serving; requests already running have their records spooled
    in both modes. The spool is replayed, in order, before newer records once the ledger
    answers again; records still held at shutdown are written to it.
    """

    def __init__(
        self,
        stub: ledger_pb2_grpc.LedgerServiceStub,
        mode: LedgerMode,
        spool_path: Path,
        registry: CollectorRegistry,
        *,
        backoff: Backoff | None = None,
        append_timeout_s: float = 5.0,
        max_batch: int = MAX_BATCH,
    ) -> None:
        self._stub = stub
        self._mode = mode
        self._spool = Spool(spool_path)
        self._metrics = SinkMetrics(registry)
        self._backoff = backoff or Backoff()
        self._append_timeout_s = append_timeout_s
        self._max_batch = max_batch
        self._queue: collections.deque[_Held] = collections.deque()
        self._available = True
        self._spool_broken = False
        self._failures = 0
        self._retry_at = 0.0
        self._wakeup = asyncio.Event()
        self._settled = asyncio.Event()
        self._delivered = asyncio.Event()
        self._closing = False
        self._worker: asyncio.Task[None] | None = None
        self._started = False
        self._metrics.available.set(1)

    @property
    def available(self) -> bool:
        return self._available

    @property
    def backlog(self) -> int:
        return len(self._queue) + len(self._spool.pending)

    async def start(self) -> None:
        await asyncio.to_thread(self._spool.load)
        if self._spool.pending:
            log.info("ledger spool: replaying", extra={"records": len(self._spool.pending)})
        self._update_backlog()
        self._started = True
        self._spawn_worker()

    def _spawn_worker(self) -> None:
        self._worker = asyncio.get_running_loop().create_task(self._run(), name="ledger-sink")

    def admit(self) -> None:
        """Raise Unavailable when a new request must be refused because of the ledger."""
        retry_after = max(1.0, self._retry_at - time.monotonic())
        if self._mode == "fail_closed" and not self._available:
            raise Unavailable(
                "the audit ledger cannot be reached; requests are refused until it is back",
                reason="LEDGER_UNAVAILABLE",
                retry_after_s=retry_after,
            )
        if self._spool_broken:
            raise Unavailable(
                "the audit ledger and the local spool both failed",
                reason="LEDGER_UNAVAILABLE",
                retry_after_s=retry_after,
            )

    async def commit(self, entry: ledger_pb2.LedgerEntry) -> None:
        """Return once the record is durable: acknowledged by the ledger, or fsync'd to the spool.

        Raises Unavailable when neither the ledger nor the spool could take it, Internal when
        the ledger refused it for good; the record is then dropped, and the caller must not
        tell its client that the request succeeded. A caller cancelled while it waits leaves
        the record on its way.
        """
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._hold(_Held(entry, otel_context.get_current(), done))
        with self._metrics.commit.time():
            await done

    def submit(self, entry: ledger_pb2.LedgerEntry) -> None:
        """Send the record without waiting for it: for a request nobody waits on any more."""
        self._hold(_Held(entry, otel_context.get_current()))

    def _hold(self, held: _Held) -> None:
        self._queue.append(held)
        if self._started and self._worker is None:
            self._spawn_worker()  # after a drain: the sink keeps working
        self._update_backlog()
        self._settled.clear()
        self._wakeup.set()

    async def delivered(self) -> None:
        """Wait until the ledger has acknowledged every record submitted so far."""
        await self._delivered.wait()

    async def settled(self) -> None:
        """Wait until the sink has done all it can for now (delivered, or waiting to retry)."""
        self._wakeup.set()
        self._settled.clear()
        await self._settled.wait()

    async def drain(self, timeout_s: float = 10.0) -> None:
        """Deliver what is held, spool what cannot be delivered in time; called on shutdown.

        The worker stops; a later `submit` or `commit` starts it again.
        """
        self._closing = True
        self._wakeup.set()
        if self._worker is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(self._worker), timeout_s)
        except TimeoutError:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
        if self._queue:
            await self._to_spool()
        self._worker = None
        self._closing = False

    # --- the worker -------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            # Cleared before the work, so a record held meanwhile wakes the wait below at once.
            self._wakeup.clear()
            if self._available or time.monotonic() >= self._retry_at:
                await self._pump()
            if self._queue and not self._available:
                # No request waits on a ledger that is down: the spool makes its record durable.
                await self._to_spool()
            self._update_backlog()
            if (
                self._closing
                and not self._queue
                and (not self._spool.pending or not self._available)
            ):
                return
            if not self._wakeup.is_set():
                self._settled.set()
            timeout = None if self._available else max(0.0, self._retry_at - time.monotonic())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), timeout)

    async def _pump(self) -> None:
        """Send the spool, then the queue, a batch at a time, until done or unreachable."""
        # Oldest first: the spool always holds records older than those in memory.
        while self._spool.pending:
            batch = [
                _Held(entry) for entry, _ in itertools.islice(self._spool.pending, self._max_batch)
            ]
            handled, reachable = await self._send(batch)
            if handled:
                await asyncio.to_thread(self._spool.advance, len(handled))
            if not reachable:
                return
        while self._queue:
            # Everything that arrived while the last batch was in flight goes in this one.
            batch = list(itertools.islice(self._queue, self._max_batch))
            handled, reachable = await self._send(batch)
            for held, error in zip(batch, handled, strict=False):
                self._queue.popleft()
                held.resolve(error)
            if not reachable:
                return

    async def _send(self, batch: list[_Held]) -> tuple[list[BaseException | None], bool]:
        """Offer `batch` to the ledger. Returns, for the records it settled (a prefix of the
        batch), None when it was taken or the error it was refused with for good; and False
        when the ledger could not be reached (the rest must wait or be spooled)."""
        self._metrics.batch.observe(len(batch))
        try:
            if len(batch) == 1:
                await self._append(batch[0])
            else:
                await self._append_batch(batch)
        except grpc.aio.AioRpcError as error:
            if error.code() in TRANSIENT:
                self._unreachable(error.code())
                return [], False
            if len(batch) == 1:
                return [self._refused(batch[0], error.code())], True
            # One record refused, or a ledger without AppendBatch: one at a time, so each
            # record keeps its own fate.
            handled: list[BaseException | None] = []
            for held in batch:
                try:
                    await self._append(held)
                except grpc.aio.AioRpcError as single:
                    if single.code() in TRANSIENT:
                        self._unreachable(single.code())
                        return handled, False
                    handled.append(self._refused(held, single.code()))
                else:
                    handled.append(None)
            self._reachable()
            return handled, True
        self._reachable()
        return [None] * len(batch), True

    async def _append(self, held: _Held) -> None:
        # Its Append joins the request's trace although this worker task sends it.
        token = otel_context.attach(held.context) if held.context is not None else None
        try:
            await self._stub.Append(
                ledger_pb2.AppendRequest(entry=held.entry), timeout=self._append_timeout_s
            )
        finally:
            if token is not None:
                otel_context.detach(token)

    async def _append_batch(self, batch: list[_Held]) -> None:
        # One call for many requests: its span links to each request's span instead.
        links = [
            trace.Link(trace.get_current_span(held.context).get_span_context())
            for held in batch
            if held.context is not None
        ]
        with trace.get_tracer(__name__).start_as_current_span(
            "ledger group commit",
            context=otel_context.Context(),
            links=[link for link in links if link.context.is_valid],
            attributes={"slm.ledger.records": len(batch)},
        ):
            await self._stub.AppendBatch(
                ledger_pb2.AppendBatchRequest(entries=[held.entry for held in batch]),
                timeout=self._append_timeout_s,
            )

    def _refused(self, held: _Held, code: grpc.StatusCode) -> BaseException:
        self._metrics.rejected.inc()
        log.error(
            "ledger refused a record",
            extra={"code": code.name, "ledger_request_id": held.entry.request_id},
        )
        return Internal(f"the audit ledger refused the request's record ({code.name})")

    def _unreachable(self, code: grpc.StatusCode) -> None:
        self._failures += 1
        self._retry_at = time.monotonic() + self._backoff.delay(self._failures)
        if self._available:
            log.error("ledger unreachable", extra={"code": code.name, "mode": self._mode})
        self._available = False
        self._metrics.available.set(0)

    def _reachable(self) -> None:
        if not self._available:
            log.info("ledger reachable again", extra={"backlog": self.backlog})
        self._available, self._failures = True, 0
        self._metrics.available.set(1)

    async def _to_spool(self) -> None:
        batch = list(self._queue)
        try:
            await asyncio.to_thread(self._spool.append, [held.entry for held in batch])
        except OSError as error:
            self._spool_broken = True
            log.error("ledger spool: write failed", extra={"error": str(error)})
            failure = Unavailable(
                "the audit ledger and the local spool both failed",
                reason="LEDGER_UNAVAILABLE",
                retry_after_s=1,
            )
            # A waiting request learns it now and its record is dropped (its client is told
            # the request failed); a record nobody waits for stays in memory for a retry.
            kept = [held for held in batch if held.done is None]
            for held in batch:
                self._queue.popleft()
                held.resolve(failure)
            self._queue.extendleft(reversed(kept))
            return
        self._spool_broken = False
        self._metrics.spooled.inc(len(batch))
        for held in batch:
            self._queue.popleft()
            held.resolve()

    def _update_backlog(self) -> None:
        backlog = self.backlog
        self._metrics.backlog.set(backlog)
        if backlog:
            self._delivered.clear()
        else:
            self._delivered.set()
