"""Continuous batching for one loaded model: every step decodes all running sequences at once.

A dedicated thread runs the loop, so the asyncio event loop never waits on llama.cpp (ctypes
releases the GIL while C runs). Each step it:

1. drops cancelled sequences (their slot and KV are freed at once), admits waiting ones into
   the lowest free slots, and moves sequences down into slots left free, so that the running
   slots stay contiguous;
2. decodes one token of every running sequence in one llama_decode, samples each with its own
   sampler chain (on several threads: with a 262k vocabulary, sampling costs about as much as
   a GPU's decode of the token) and hands the new events to the event loop in one call, made
   right before the next llama_decode: that call lets go of the GIL for its whole length, so
   the event loop's work on the events never holds up the step;
3. prefills chunks of prompts still being read, each chunk in its own llama_decode: while
   streams are running, one chunk's worth of prompt tokens a step, so a burst of new prompts
   never stalls them for long; with none running, as much as the batch holds. A prompt's
   first token goes out as soon as its last chunk is read (with the next llama_decode).

Why the shapes matter. With one KV stream per slot, llama.cpp computes a batch in one pass only
over a run of consecutive sequence ids holding the same number of tokens; every break in the
run costs another pass over all the weights (a third more per step with 16 scattered slots).
And its CPU attention picks its kernel by the number of a sequence's tokens in the pass (tiled
from 64 up), so a token's logits depend on the pass it was computed in. Decode passes hold one
token per sequence, and a prompt's chunk boundaries depend only on the prompt and its prefix
plan, never on what else is running: the same seed gives the same text alone or batched.

llama.cpp applies LoRA adapters per context, not per sequence, so a step only batches
sequences that share an adapter set; groups take turns step by step.

Constrained decoding. A request's constraint is compiled (llguidance, `constraints.Grammars`)
before it is queued, so a grammar that cannot compile fails it before any token. Each
constrained sequence has a `Guide`; the masks of a step's constrained sequences are computed
together on another thread while llama_decode runs (their states are known before it starts),
and each row samples only among its allowed tokens; rows without a constraint take exactly their
usual path. A grammar that is complete ends its sequence (STOP) without another token.

Backend sampling. On a context with backend sampling (a GPU's, `llama_api.Context`), the
sampler chain of each sequence runs inside the decode graph: only the token of a row comes back
to the host, not its 262k logits. A sequence samples on the host instead where the graph cannot:
a constrained sequence (its token mask), one that asks for logprobs (they read the row's
logits), and a prompt's first token when siblings share its row; rows sampled on the host and
in the graph share a decode. Each chain keeps its own RNG wherever it runs, so the same seed
gives the same text alone or batched.

Choices (`n`). A request with n > 1 takes n slots at once (it waits as one unit); its prompt is
prefilled once, in the first slot, and at its last chunk the KV is copied into the others
(llama_memory_seq_cp), which then sample from the same logits row with their own chains and
guides. Events carry their choice's index; the request ends after n End events.
"""

from __future__ import annotations

import asyncio
import codecs
import collections
import concurrent.futures
import ctypes
import enum
import heapq
import logging
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from inference_local.constraints import Constraint, Grammar, Grammars, Guide, Outcome
from inference_local.llama_api import Batch, Context, LoraAdapter, Model, Sampler
from inference_local.prefix_cache import PrefixPlan
from inference_local.sampling import (
    Sampling,
    StopMatcher,
    TokenLogprob,
    TopLogprob,
    log_softmax_at,
)
from slm.errors import DeadlineExceeded, Internal, InvalidArgument, ResourceExhausted, SlmError

log = logging.getLogger(__name__)

AdapterSet = tuple[tuple[LoraAdapter, float], ...]


class Finish(enum.Enum):
    STOP = "stop"
    LENGTH = "length"
    CANCELLED = "cancelled"


@dataclass(frozen=True)
class Delta:
    text: str
    logprobs: tuple[TokenLogprob, ...] = ()
    # The choice (0 to n - 1) this text belongs to.
    index: int = 0


@dataclass(frozen=True)
class End:
    """The end of one choice; a request with n choices gets n of them."""

    finish: Finish
    prompt_tokens: int
    completion_tokens: int
    model: str
    index: int = 0
    # The stop string that ended it, if one did.
    stop_sequence: str = ""


Event = Delta | End


@dataclass(eq=False)
class SeqRequest:
    """A generation handed to the scheduler; `cancelled` is set by the event loop."""

    prompt: list[int]
    sampling: Sampling
    adapters: AdapterSet = ()
    queue: asyncio.Queue[list[Event] | BaseException] = field(default_factory=asyncio.Queue)
    cancelled: bool = False
    submitted: float = field(default_factory=time.perf_counter)
    # Prefix caching: a state to restore at admission and where to snapshot; None: none.
    prefix: PrefixPlan | None = None
    # What the output must be; None: free text.
    constraint: Constraint | None = None
    # Independent choices of the same prompt, sharing its prefill.
    n: int = 1
    # The constraint compiled for the model, set by `Scheduler.generate`.
    grammar: Grammar | None = None
    # Since when (time.monotonic) the oldest output its reader has not taken waits; set by the
    # event loop when output lands in an empty queue.
    pending_since: float = 0.0
    # Stopped because its reader left output untaken too long (or too much of it).
    stalled: bool = False
    # When (time.monotonic) the decode thread last handed its events to the event loop.
    sent_at: float = float("-inf")


@dataclass(eq=False)
class _Seq:
    """A request occupying a sequence slot."""

    request: SeqRequest
    slot: int
    sampler: Sampler
    max_tokens: int
    stops: StopMatcher
    decoder: codecs.IncrementalDecoder
    # Which of the request's choices this is.
    index: int = 0
    guide: Guide | None = None
    # A sibling waiting for the first choice (`follows`) to prefill the prompt it shares.
    follows: _Seq | None = None
    prompt_pos: int = 0
    n_past: int = 0
    generated: int = 0
    next_token: int = -1
    last_token_at: float = 0.0
    released: bool = False
    # Its chain could not run in the decode graph (llama.cpp's device lacks an op of it).
    host_only: bool = False

    @property
    def prefilling(self) -> bool:
        return self.prompt_pos < len(self.request.prompt)


def name_os_thread(name: str) -> None:
    """Name the calling thread for the OS (top -H, /proc/PID/task/TID/comm), so that the CPU
    the decode thread takes can be told from the event loop's and llama.cpp's workers'."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None)
        libc.prctl(PR_SET_NAME, name.encode()[:15], 0, 0, 0)


PR_SET_NAME = 15


def coalesce(events: list[Event]) -> list[Event]:
    """One Delta per choice for the Deltas it has before its End (choices are independent
    streams, so a later Delta may join an earlier one of its choice past another choice's)."""
    merged: list[Event] = []
    open_at: dict[int, int] = {}
    for event in events:
        if isinstance(event, Delta):
            at = open_at.get(event.index)
            if at is None:
                open_at[event.index] = len(merged)
                merged.append(event)
            else:
                head = merged[at]
                assert isinstance(head, Delta)
                merged[at] = Delta(
                    head.text + event.text, head.logprobs + event.logprobs, head.index
                )
        else:
            open_at.pop(event.index, None)
            merged.append(event)
    return merged


# The most choices (n) one request may ask for.
MAX_N = 8


@dataclass(frozen=True)
class SchedulerConfig:
    name: str
    n_slots: int
    max_queue: int
    prefill_chunk: int
    n_batch: int
    # Threads sampling a step's sequences, the decode thread included (1: it alone).
    sample_threads: int = 1
    # Read a step's prompt chunks of several sequences in one llama_decode, as llama-server
    # does (on this 2-core CPU 3% to 7% faster than a decode each: bench/prompt_passes.py).
    # Off for a batch-invariant replica: a chunk's KV then never depends on which other
    # prompts arrived with it.
    batch_prompts: bool = True
    max_n: int = MAX_N
    # A stream whose output waits untaken this long, or this many steps of it, is stopped.
    stall_timeout_s: float = 30.0
    max_undelivered_steps: int = 1024
    # A request's events sampled within this of its last message wait for the next (0: none
    # wait); InferenceLocalConfig.stream_interval_s.
    stream_interval_s: float = 0.0


class SchedulerMetrics:
    """What the scheduler reports; implemented over Prometheus by the engine."""

    def step(self, batch_tokens: int, running: int, waiting: int, kv_used: float) -> None: ...

    def idle(self, waiting: int) -> None: ...

    def token(self, n: int) -> None: ...

    def moved(self) -> None: ...

    def first_token(self, seconds: float) -> None: ...

    def inter_token(self, seconds: float) -> None: ...

    def finished(self, reason: str, prompt_tokens: int) -> None: ...


class Scheduler:
    def __init__(
        self,
        config: SchedulerConfig,
        model: Model,
        context: Context,
        metrics: SchedulerMetrics,
        loop: asyncio.AbstractEventLoop,
        grammars: Grammars | None = None,
    ) -> None:
        """`grammars`: the weights' constrained-decoding state, shared by every scheduler of
        the same weights (one vocabulary build, one grammar cache); None makes its own."""
        self.config = config
        self._model = model
        self._context = context
        self._metrics = metrics
        self._loop = loop
        self._cond = threading.Condition()
        self._waiting: collections.deque[SeqRequest] = collections.deque()
        self._active: list[_Seq] = []
        self._free_slots = list(range(config.n_slots))  # a heap: the lowest slot first
        self._batch = Batch(config.n_batch)
        self._outgoing: list[tuple[SeqRequest, list[Event] | BaseException]] = []
        # Events waiting for their request's stream interval, in the order sampled.
        self._held: dict[SeqRequest, list[Event]] = {}
        # How long a step takes (a moving average, seconds; 0 before the first).
        self._step_s = 0.0
        self._chunk = min(config.prefill_chunk, config.n_batch)
        self._stopping = False
        self._group_turn = 0
        self.last_used = time.monotonic()
        self._samplers = (
            concurrent.futures.ThreadPoolExecutor(
                config.sample_threads - 1, thread_name_prefix=f"sample-{config.name}"
            )
            if config.sample_threads > 1
            else None
        )
        self._grammars = grammars or Grammars(model, mask_threads=config.sample_threads)
        # Computes a step's token masks while the decode thread waits in llama_decode.
        self._masker = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix=f"mask-{config.name}"
        )
        # llguidance's view of the vocabulary takes seconds to build (262k tokens for Gemma 3):
        # the Engine builds it before the model serves; a scheduler made without one builds
        # it now, in the background, rather than in the first constrained request.
        self._masker.submit(self._grammars.tokenizer)
        # Slots in a KV copy that llama.cpp carries out at the next decode.
        self._copying: set[int] = set()
        # Prompt tokens computed by llama_decode (not restored, not copied), for tests and
        # benchmarks.
        self.prompt_tokens_decoded = 0
        # Decodes that read prompt chunks, for tests and benchmarks.
        self.prompt_passes = 0
        # Tokens sampled inside the decode graph (backend sampling), for tests and benchmarks.
        self.tokens_sampled_on_device = 0
        self._thread = threading.Thread(target=self._run, name=f"decode-{config.name}", daemon=True)
        self._thread.start()

    # --- event loop side -------------------------------------------------------------------

    @property
    def busy(self) -> int:
        with self._cond:
            return len(self._active) + len(self._waiting)

    async def generate(self, request: SeqRequest) -> AsyncIterator[Event]:
        """Stream a request's events, its choices' interleaved, until each choice's End;
        leaving the iteration early cancels it. A bad `n` or a constraint that cannot be
        compiled is an InvalidArgument raised before the request is queued."""
        n = request.n
        if not 1 <= n <= min(self.config.max_n, self.config.n_slots):
            limit = (
                f"at most {self.config.max_n}"
                if self.config.max_n <= self.config.n_slots
                else f"at most {self.config.n_slots}, the sequence slots of model "
                f"{self.config.name!r}"
            )
            raise InvalidArgument(f"n must be at least 1 and {limit}", field="sampling.n")
        if request.constraint is not None and request.grammar is None:
            request.grammar = self._grammars.cached(request.constraint)
            if request.grammar is None:
                # Milliseconds; seconds the first time (the model's vocabulary).
                request.grammar = await asyncio.to_thread(
                    self._grammars.compile, request.constraint
                )
        with self._cond:
            if self._stopping:
                raise ResourceExhausted(
                    f"model {self.config.name!r} is unloading", retry_after_s=1.0
                )
            if len(self._free_slots) < n and len(self._waiting) >= self.config.max_queue:
                raise ResourceExhausted(
                    f"model {self.config.name!r}: all {self.config.n_slots} sequence slots busy "
                    f"and {len(self._waiting)} requests waiting (queue limit "
                    f"{self.config.max_queue})",
                    retry_after_s=1.0,
                )
            self._waiting.append(request)
            self.last_used = time.monotonic()
            self._cond.notify()
        done = False
        ends = 0
        try:
            while True:
                item = await request.queue.get()
                # A consumer that fell behind finds several steps waiting: they leave as one
                # event per choice rather than one message per token down the mesh.
                while not isinstance(item, BaseException) and not request.queue.empty():
                    more = request.queue.get_nowait()
                    if isinstance(more, BaseException):
                        # Deliver what was generated, then the failure.
                        request.queue.put_nowait(more)
                        break
                    item = [*item, *more]
                if isinstance(item, BaseException):
                    done = True
                    raise item
                for event in coalesce(item) if len(item) > 1 else item:
                    if isinstance(event, End):
                        ends += 1
                        done = ends == n
                    yield event
                if done:
                    return
        finally:
            if not done:
                request.cancelled = True
                with self._cond:
                    self._cond.notify()

    def close(self) -> None:
        """Stop the loop after failing whatever is still queued or running."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join()
        if self._samplers is not None:
            self._samplers.shutdown()
        self._masker.shutdown()
        self._batch.close()

    # --- decode thread ---------------------------------------------------------------------

    def _deliver(self, outbox: list[tuple[SeqRequest, list[Event] | BaseException]]) -> None:
        """Queue each request's output for its reader (on the event loop); a reader that has
        left output untaken for stall_timeout_s, or max_undelivered_steps of it, stops its
        stream, so a stalled client holds a slot and memory only that long."""
        now = time.monotonic()
        for request, item in outbox:
            if request.stalled:
                continue  # nobody will read it: nothing more is kept
            queue = request.queue
            if queue.empty():
                request.pending_since = now
            elif isinstance(item, list) and (
                queue.qsize() >= self.config.max_undelivered_steps
                or now - request.pending_since >= self.config.stall_timeout_s
            ):
                self._stall(request, now)
                continue
            queue.put_nowait(item)

    def _stall(self, request: SeqRequest, now: float) -> None:
        """Stop a stream whose reader stalled: the decode thread frees its slot at the next
        step; the reader, should it come back, gets what was queued, then the error."""
        waited = now - request.pending_since
        untaken = request.queue.qsize()
        request.stalled = True
        request.cancelled = True
        request.queue.put_nowait(
            DeadlineExceeded(
                f"the stream's reader left {untaken} steps of output untaken for {waited:.1f} s",
                reason="READER_STALLED",
            )
        )
        log.warning(
            "stream stopped: its reader left %d steps of output untaken for %.1f s",
            untaken,
            waited,
            extra={"model": self.config.name},
        )
        with self._cond:
            self._cond.notify()

    def _post(self, items: Iterable[tuple[SeqRequest, list[Event] | BaseException]]) -> None:
        """Queue events for the event loop; they leave at the next `_flush`. While steps take
        less than stream_interval_s, a request's events sampled within it of its last message
        are held and leave with a later one; an End or a failure takes whatever is held with
        it at once. Steps as long as the interval hold nothing: holding would only delay a
        token by a step, not spare a message."""
        interval = self.config.stream_interval_s
        if interval <= 0:  # nothing is ever held: the per-token path stays a list extend
            self._outgoing.extend(items)
            return
        hold = self._holding()
        now = time.monotonic()
        for request, item in items:
            held = self._held.pop(request, None) if self._held else None
            if isinstance(item, BaseException):
                if held:
                    self._outgoing.append((request, held))
                self._outgoing.append((request, item))
                continue
            # Held events never include an End, so only the new ones are looked at.
            ends = any(isinstance(e, End) for e in item)
            if held:
                held.extend(item)
                item = held
            if hold and not ends and now - request.sent_at < interval:
                self._held[request] = item
                continue
            request.sent_at = now
            self._outgoing.append((request, item))

    def _holding(self) -> bool:
        return 0 < self._step_s < self.config.stream_interval_s

    def _release_held(self) -> None:
        """Queue the held events whose interval has passed, or all of them when no sequence
        is running (no later step would take them) or steps no longer hold."""
        now = time.monotonic()
        interval = self.config.stream_interval_s
        keep = bool(self._active) and self._holding()
        due = [request for request in self._held if not keep or now - request.sent_at >= interval]
        for request in due:
            request.sent_at = now
            self._outgoing.append((request, self._held.pop(request)))

    def _flush(self) -> None:
        """Hand the queued events to the event loop, in one hop whatever their number. Called
        right before a decode (which lets go of the GIL for its whole length, so the loop's
        work on them never makes this thread wait for the GIL) and whenever the thread is
        about to idle."""
        if self._held:
            self._release_held()
        if self._outgoing:
            self._loop.call_soon_threadsafe(self._deliver, self._outgoing)
            self._outgoing = []

    def _decode(self, batch: Batch) -> None:
        self._flush()
        self._context.decode(batch)
        self._copying.clear()  # llama.cpp carried out the pending KV copies first

    def _run(self) -> None:
        name_os_thread("slm-decode")
        try:
            self._loop_steps()
        except BaseException:
            # A bug must not leave requests waiting on a thread that is gone: fail them all,
            # and every later one (generate checks _stopping).
            log.exception("decode thread failed", extra={"model": self.config.name})
            with self._cond:
                self._stopping = True
            failure = Internal(f"model {self.config.name!r}: the decode thread failed")
            self._post([(s.request, failure) for s in self._active])
            self._post([(r, failure) for r in self._waiting])
            self._waiting.clear()
            self._flush()
            raise

    def _loop_steps(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and not self._waiting and not self._active:
                    self._cond.wait()
                if self._stopping:
                    break
                admitted = self._admit()
            self._post(admitted)
            try:
                started = time.monotonic()
                self._step()
                took = time.monotonic() - started
                self._step_s = took if self._step_s == 0 else 0.9 * self._step_s + 0.1 * took
            except Exception as error:  # a failed decode fails the sequences in it, not the loop
                log.exception("decode step failed", extra={"model": self.config.name})
                failure = error if isinstance(error, SlmError) else Internal("decode failed")
                self._post([(seq.request, failure) for seq in self._active])
                for seq in list(self._active):
                    self._release(seq)
            if not self._active:
                self._flush()
        failure = ResourceExhausted(f"model {self.config.name!r} was unloaded", retry_after_s=1)
        self._post([(s.request, failure) for s in self._active])
        self._post([(r, failure) for r in self._waiting])
        for seq in list(self._active):
            self._release(seq)
        self._waiting.clear()
        self._flush()

    def _admit(self) -> list[tuple[SeqRequest, BaseException]]:
        """Move waiting requests into free slots, all of a request's choices at once, in
        order (called with the lock held)."""
        refused: list[tuple[SeqRequest, BaseException]] = []
        while self._waiting:
            request = self._waiting[0]
            if request.cancelled:
                self._waiting.popleft()
                continue
            if len(self._free_slots) < request.n:
                break
            self._waiting.popleft()
            try:
                seqs = self._seqs(request)
            except Exception as error:
                refused.append((request, error))
                continue
            self._active.extend(seqs)
            if request.prefix is not None and request.prefix.restore is not None:
                try:
                    self._restore(seqs[0], request.prefix)
                except Exception:
                    # A state that cannot be restored is a full prefill, not a dead thread.
                    log.exception("prefix restore failed", extra={"model": self.config.name})
                    self._context.clear_seq(seqs[0].slot)
                    seqs[0].prompt_pos = seqs[0].n_past = 0
                    request.prefix.refused()
        return refused

    def _seqs(self, request: SeqRequest) -> list[_Seq]:
        """A request's choices in the lowest free slots: the first reads the prompt, the
        others follow it."""
        slots = [heapq.heappop(self._free_slots) for _ in range(request.n)]
        samplers: list[Sampler] = []
        try:
            for index in range(request.n):
                samplers.append(Sampler(self._model, request.sampling.sampler_config(index)))
            room = self._context.n_ctx_per_seq - len(request.prompt)
            limit = min(request.sampling.max_tokens or room, room)
            seqs: list[_Seq] = []
            for index, (slot, sampler) in enumerate(zip(slots, samplers, strict=True)):
                if request.sampling.uses_penalties:
                    sampler.accept_prompt(request.prompt)
                seqs.append(
                    _Seq(
                        request=request,
                        slot=slot,
                        sampler=sampler,
                        max_tokens=limit,
                        stops=StopMatcher(request.sampling.stop),
                        decoder=codecs.getincrementaldecoder("utf-8")("replace"),
                        index=index,
                        guide=request.grammar.start() if request.grammar is not None else None,
                        follows=seqs[0] if seqs else None,
                    )
                )
        except Exception:
            # Whatever failed, the slots go back: a slot lost here would be lost for good, and
            # once all were, every request would wait forever.
            for sampler in samplers:
                sampler.close()
            for slot in slots:
                heapq.heappush(self._free_slots, slot)
            raise
        return seqs

    def _restore(self, seq: _Seq, plan: PrefixPlan) -> None:
        """Start a sequence from a cached prefix state; a refused state is a full prefill."""
        assert plan.restore is not None
        if seq.slot in self._copying:
            # llama.cpp would overwrite the restored state with a pending copy at the next
            # decode: prefill instead (rare: a slot freed in the step that copied a prompt).
            return
        if self._context.set_seq_state(seq.slot, plan.restore.state):
            seq.prompt_pos = seq.n_past = plan.restore.n_tokens
        else:
            log.warning("prefix state refused by llama.cpp", extra={"model": self.config.name})
            plan.refused()

    def _snapshot(self, seq: _Seq) -> None:
        """Copy the sequence's state if it reached a snapshot point; the cache stores it off
        this thread."""
        plan = seq.request.prefix
        if plan is not None and plan.wants(seq.prompt_pos):
            started = time.perf_counter()
            state = self._context.seq_state(seq.slot)
            plan.store(seq.prompt_pos, state, time.perf_counter() - started)

    def _release(self, seq: _Seq) -> None:
        self._context.clear_seq(seq.slot)
        self._context.retire(seq.sampler)
        seq.released = True
        self._active.remove(seq)
        with self._cond:
            heapq.heappush(self._free_slots, seq.slot)

    def _fail(self, request: SeqRequest, error: SlmError) -> None:
        """Fail one request, every choice of it, and leave the others running."""
        log.error("generation failed: %s", error.message, extra={"model": self.config.name})
        self._post([(request, error)])
        for seq in [s for s in self._active if s.request is request]:
            self._release(seq)

    def _finished(self, seq: _Seq, reason: str) -> None:
        # The prompt was read once, whatever the number of choices.
        self._metrics.finished(reason, len(seq.request.prompt) if seq.index == 0 else 0)

    def _finish(self, seq: _Seq, finish: Finish, events: list[Event], drain: bool = True) -> None:
        if drain:
            # Release what was held back: an incomplete character, or text that only looked
            # like the start of a stop string.
            tail = seq.decoder.decode(b"", final=True)
            if seq.guide is not None and seq.guide.active:
                text, stopped = seq.stops.flush() + tail, False
            else:
                text, stopped = seq.stops.feed(tail)
            if stopped:
                finish = Finish.STOP
            else:
                text += seq.stops.flush()
            if text:
                events.append(Delta(text, index=seq.index))
        events.append(
            End(
                finish,
                len(seq.request.prompt),
                seq.generated,
                self.config.name,
                seq.index,
                seq.stops.matched if finish is Finish.STOP else "",
            )
        )
        self._finished(seq, finish.value)
        self._release(seq)

    def _group(self) -> AdapterSet:
        """The adapter set this step serves; sets take turns when several are active."""
        sets: list[AdapterSet] = []
        for seq in self._active:
            if seq.request.adapters not in sets:
                sets.append(seq.request.adapters)
        self._group_turn = (self._group_turn + 1) % len(sets)
        return sets[self._group_turn]

    def _compact(self) -> None:
        """Move the sequences in the highest slots down into free lower ones, so the running
        slots form one run. Called right before a decode, which carries out the copies before
        anything else can write the vacated slots."""
        with self._cond:
            while self._free_slots and self._active:
                top = max(self._active, key=lambda s: s.slot)
                if self._free_slots[0] > top.slot:
                    return
                slot = heapq.heappop(self._free_slots)
                self._context.move_seq(top.slot, slot)
                heapq.heappush(self._free_slots, top.slot)
                top.slot = slot
                self._metrics.moved()

    def _place(self, seq: _Seq, prompt_end: bool = False) -> None:
        """Decide where the sequence's next output is sampled, right before the decode that
        computes it: in the graph (its chain attached to its slot) or on the host (the slot
        returns logits). `prompt_end`: the output is its prompt's last row."""
        context = self._context
        if not context.backend_sampling:
            return
        request = seq.request
        on_device = not (
            seq.host_only
            or seq.guide is not None  # its token mask is applied on the host
            or request.sampling.logprobs  # they are read from the row's logits
            or (prompt_end and request.n > 1)  # the siblings sample the same row
        )
        if not on_device:
            context.detach(seq.slot)
        elif not context.attach(seq.slot, seq.sampler):
            seq.host_only = True  # attaching again would fail again
            log.warning(
                "sampler chain cannot run on the device; sampling on the host",
                extra={"model": self.config.name},
            )

    def _chunk_end(self, seq: _Seq) -> int:
        """Where the sequence's next prompt chunk ends: a function of the prompt and its prefix
        plan only, so the chunks are the same whatever else shares the steps."""
        prompt = seq.request.prompt
        end = min(len(prompt), seq.prompt_pos + self._chunk)
        if seq.request.prefix is not None:
            # A chunk ends at a snapshot point, so the state there can be copied.
            point = seq.request.prefix.next_save(seq.prompt_pos)
            if point is not None:
                end = min(end, point)
        return end

    def _step(self) -> None:
        for seq in [s for s in self._active if s.request.cancelled]:
            self._finished(seq, "stalled" if seq.request.stalled else Finish.CANCELLED.value)
            self._release(seq)
        if not self._active:
            # No step to observe, but the gauges must not keep the sequences just dropped.
            self._metrics.idle(len(self._waiting))
            return
        self._compact()
        group = self._group()
        members = [s for s in self._active if s.request.adapters == group]
        self._context.set_adapters(group)
        batch = self._batch
        # While streams are running, a step reads at most one chunk of prompts (at least one
        # chunk), so their next token never waits for more than a chunk's prefill; with none
        # running, nobody waits and a step reads as much as the batch holds.
        budget = self._chunk if any(not s.prefilling for s in self._active) else batch.capacity
        decoding = sorted((s for s in members if not s.prefilling), key=lambda s: s.slot)
        sampled = 0
        if decoding:
            batch.clear()
            outputs = [
                (seq, batch.add(seq.next_token, seq.n_past, seq.slot, True)) for seq in decoding
            ]
            for seq in decoding:
                self._place(seq)
            masks = self._decode_masked(batch, [seq.guide for seq in decoding])
            for seq in decoding:
                seq.n_past += 1
            # Out with the next decode: before the prompt chunks below, if any.
            sampled += self._sample(outputs, masks)
        pieces: list[tuple[_Seq, int]] = []
        prefilled = 0
        for seq in [s for s in members if s.prefilling and s.follows is None]:
            end = self._chunk_end(seq)
            take = end - seq.prompt_pos
            if prefilled and take > budget:
                continue
            pieces.append((seq, end))
            budget -= take
            prefilled += take
            if budget <= 0:
                break
        # One pass for all the chunks, in slot order (llama.cpp reads consecutive slots' tokens
        # together), or a pass each in a batch-invariant replica.
        if self.config.batch_prompts and pieces:
            passes = [sorted(pieces, key=lambda piece: piece[0].slot)]
        else:
            passes = [[piece] for piece in pieces]
        for chunks in passes:
            sampled += self._prefill(chunks)
        used = sum(s.n_past for s in self._active)
        total = self._context.n_ctx_per_seq * self.config.n_slots
        self._metrics.step(
            len(decoding) + prefilled, len(self._active), len(self._waiting), used / total
        )
        self._metrics.token(sampled)

    def _prefill(self, pieces: list[tuple[_Seq, int]]) -> int:
        """Read each sequence's prompt up to its piece's end in one decode; a sequence whose
        prompt ends there samples its first token (and its siblings theirs). Returns the
        number of tokens sampled."""
        batch = self._batch
        batch.clear()
        ending: list[tuple[_Seq, int]] = []
        for seq, end in pieces:
            last = end == len(seq.request.prompt)
            index = batch.add_many(
                seq.request.prompt[seq.prompt_pos : end], seq.n_past, seq.slot, last
            )
            if last:
                self._place(seq, prompt_end=True)
                ending.append((seq, index))
        # Siblings start in the same grammar state: the first one's mask serves them all.
        masks = self._decode_masked(batch, [seq.guide for seq, _ in ending])
        self.prompt_passes += 1
        for seq, end in pieces:
            self.prompt_tokens_decoded += end - seq.prompt_pos
            seq.prompt_pos = seq.n_past = end
            self._snapshot(seq)
        choices: list[tuple[_Seq, int]] = []
        rows: list[npt.NDArray[np.int32] | None] = []
        for row, (seq, index) in enumerate(ending):
            mask = masks[row] if masks is not None else None
            for choice in [seq, *self._siblings(seq)]:
                choices.append((choice, index))
                rows.append(mask)
        # The first tokens go out with the next decode, not after the step's other work.
        return self._sample(choices, rows) if choices else 0

    def _sample(
        self,
        outputs: list[tuple[_Seq, int]],
        masks: list[npt.NDArray[np.int32] | None] | None,
    ) -> int:
        """Sample each sequence's row (its batch index) of the last decode, `masks[i]` the
        allowed tokens of outputs[i] (None: all), and queue the events of its token for the
        next flush; returns the number of tokens sampled."""
        work = [(seq.sampler, index) for seq, index in outputs]
        self.tokens_sampled_on_device += sum(s.slot is not None for s, _ in work)
        tokens = Sampler.sample_many(self._context, work, self._samplers, masks)
        out: list[tuple[SeqRequest, list[Event]]] = []
        for (seq, index), token in zip(outputs, tokens, strict=True):
            if seq.released:  # a sibling's failure ended it
                continue
            events: list[Event] = []
            self._emit(seq, index, token, events)
            if events:
                out.append((seq.request, events))
        self._post(out)
        return len(outputs)

    def _decode_masked(
        self, batch: Batch, guides: list[Guide | None]
    ) -> list[npt.NDArray[np.int32] | None] | None:
        """Decode the batch while another thread computes the token masks of the rows whose
        guide constrains their next token; returns a mask per row (None for free rows), or
        None when no row is constrained."""
        rows: list[int] = []
        active: list[Guide] = []
        for i, guide in enumerate(guides):
            if guide is not None and guide.active:
                rows.append(i)
                active.append(guide)
        if not rows:
            self._decode(batch)
            return None
        filled = self._grammars.new_masks(len(rows))
        future = self._masker.submit(self._grammars.fill, active, filled)
        try:
            self._decode(batch)
        finally:
            # Never leave a matcher in use on the other thread.
            concurrent.futures.wait([future])
        future.result()
        masks: list[npt.NDArray[np.int32] | None] = [None] * len(guides)
        for row, i in enumerate(rows):
            masks[i] = filled[row]
        return masks

    def _siblings(self, seq: _Seq) -> list[_Seq]:
        """The choices waiting for `seq`'s prompt, which has just been read: each gets a copy
        of its KV (carried out by llama.cpp at the next decode)."""
        siblings = [s for s in self._active if s.follows is seq]
        for sibling in siblings:
            self._context.copy_seq(seq.slot, sibling.slot)
            self._copying.update((seq.slot, sibling.slot))
            sibling.prompt_pos = sibling.n_past = seq.n_past
            sibling.follows = None
        return siblings

    def _emit(self, seq: _Seq, index: int, token: int, events: list[Event]) -> None:
        """Turn a sequence's sampled token into events, and finish it when it is done."""
        if token < 0:  # its grammar allowed no token
            assert seq.guide is not None
            self._fail(seq.request, Internal(f"constrained decoding: {seq.guide.error()}"))
            return
        model = self._model
        now = time.perf_counter()
        if seq.generated == 0:
            self._metrics.first_token(now - seq.request.submitted)
        else:
            self._metrics.inter_token(now - seq.last_token_at)
        seq.last_token_at = now
        seq.generated += 1
        logprobs: tuple[TokenLogprob, ...] = ()
        if seq.request.sampling.logprobs:
            logprobs = (self._logprob(token, index, seq.request.sampling.top_logprobs),)
        if model.is_eog(token):
            if logprobs:
                events.append(Delta("", logprobs, seq.index))
            self._finish(seq, Finish.STOP, events)
            return
        piece = model.piece(token)
        guide = seq.guide
        outcome = Outcome.GOING
        free = guide is None or not guide.active
        if guide is not None:
            try:
                outcome = guide.accept(token, piece)
            except SlmError as error:
                self._fail(seq.request, error)
                return
        decoded = seq.decoder.decode(piece)
        if guide is None or not guide.active:
            text, stopped = seq.stops.feed(decoded)
        else:
            # Stop strings do not apply inside a constrained part; what they held back of
            # the free text before it goes out now.
            text, stopped = (seq.stops.flush() if free else "") + decoded, False
        if text or logprobs:
            events.append(Delta(text, logprobs, seq.index))
        if stopped:
            self._finish(seq, Finish.STOP, events, drain=False)
        elif outcome is not Outcome.GOING:
            # The grammar is complete (only EOS could follow), or the text after a trigger
            # left it.
            self._finish(seq, Finish.STOP, events)
        elif seq.generated >= seq.max_tokens or seq.n_past + 1 >= self._context.n_ctx_per_seq:
            self._finish(seq, Finish.LENGTH, events)
        else:
            seq.next_token = token

    def _logprob(self, token: int, index: int, top: int) -> TokenLogprob:
        model = self._model
        chosen, best = log_softmax_at(self._context.logits(index), token, top)
        piece = model.piece(token)
        return TokenLogprob(
            token=piece.decode("utf-8", "replace"),
            logprob=chosen,
            bytes=piece,
            top=tuple(
                TopLogprob(model.piece(t).decode("utf-8", "replace"), lp, model.piece(t))
                for t, lp in best
            ),
        )


class SchedulerGroup:
    """One model's schedulers, each over a llama.cpp context of its own with a share of the
    slots and a decode thread: on a GPU, while one context's step runs on the device, another's
    thread samples its rows on the host. A request goes whole (all its choices) to the member
    with the fewest slots asked of it by requests not yet ended, among those with slots
    enough for its `n`; counted on the event loop as it is routed, so a burst of requests
    spreads evenly before any of them is queued."""

    def __init__(self, members: list[Scheduler]) -> None:
        if not members:
            raise ValueError("a scheduler group needs at least one scheduler")
        self.members = members
        self._asked = [0] * len(members)

    @property
    def busy(self) -> int:
        return sum(member.busy for member in self.members)

    @property
    def last_used(self) -> float:
        return max(member.last_used for member in self.members)

    @property
    def tokens_sampled_on_device(self) -> int:
        return sum(member.tokens_sampled_on_device for member in self.members)

    def generate(self, request: SeqRequest) -> AsyncIterator[Event]:
        """The member's `Scheduler.generate` (straight through with one member)."""
        if len(self.members) == 1:
            return self.members[0].generate(request)
        return self._routed(request)

    async def _routed(self, request: SeqRequest) -> AsyncIterator[Event]:
        fits = [i for i, m in enumerate(self.members) if m.config.n_slots >= request.n]
        largest = self.members[0].config  # the shares go down from the first
        if not fits and 1 <= request.n <= largest.max_n:
            total = sum(member.config.n_slots for member in self.members)
            raise InvalidArgument(
                f"n must be at most {largest.n_slots}: model {largest.name!r} splits its "
                f"{total} sequence slots over {len(self.members)} decode contexts, "
                "and a request's choices share one",
                field="sampling.n",
            )
        # A bad n otherwise: the first member refuses it (Scheduler.generate).
        i = min(fits, key=self._asked.__getitem__) if fits else 0
        self._asked[i] += request.n
        try:
            async for event in self.members[i].generate(request):
                yield event
        finally:
            self._asked[i] -= request.n

    def close(self) -> None:
        for member in self.members:
            member.close()
