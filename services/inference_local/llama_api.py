"""A thin, typed layer over llama.cpp's C API (through llama-cpp-python's ctypes bindings).

Everything that touches ctypes lives here, so the scheduler reads as plain Python. Objects own
their C resources and free them in `close()`; none of them is thread-safe: a context and its
samplers are used only by the decode thread of their model.
"""

from __future__ import annotations

import collections
import concurrent.futures
import ctypes
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import llama_cpp as C
import numpy as np
import numpy.typing as npt

from inference_local import shortlist
from slm.errors import FailedPrecondition, Internal, InvalidArgument

_backend_lock = threading.Lock()
_backend_ready = False

# llama-cpp-python calls every C function through ctypes.CDLL, which lets go of the GIL for the
# call and takes it back after. For the calls below, made for every row of every decode step
# (and for every token of the vocabulary when llguidance's view of it is built) and done in a
# microsecond or less, taking it back costs far more than the call: another
# thread (the event loop, another model's or context's decode thread, a sampler thread) takes
# the GIL meanwhile and the caller waits for that thread's Python (0.15 us a call when held,
# 16-23 us under contention from one busy thread on this project's 2-core machine). The same
# functions through ctypes.PyDLL keep the GIL. Calls that may wait on a device (llama_decode,
# the first read of a decode's outputs: `Context.settle_outputs`) or scan a vocabulary
# (llama_sampler_sample, a chain over a long candidate list) still let go of it.
_HOLDING_GIL = ctypes.PyDLL(C.llama_cpp._lib._name, handle=C.llama_cpp._lib._handle)


def _holding_gil(name: str) -> Any:
    """llama.cpp's function `name`, called without letting go of the GIL."""
    released = getattr(C, name)
    held = getattr(_HOLDING_GIL, name)
    held.argtypes = released.argtypes
    held.restype = released.restype
    return held


_token_to_piece = _holding_gil("llama_token_to_piece")
_vocab_is_eog = _holding_gil("llama_vocab_is_eog")
_vocab_get_attr = _holding_gil("llama_vocab_get_attr")
_sampler_accept = _holding_gil("llama_sampler_accept")
_sampler_apply = _holding_gil("llama_sampler_apply")
_get_logits_ith = _holding_gil("llama_get_logits_ith")
_get_sampled_token_ith = _holding_gil("llama_get_sampled_token_ith")
# A chain run over at most this many candidates (a shortlist: a few dozen) keeps the GIL; one
# over more (the tokens a grammar allows, up to the whole vocabulary) lets go of it.
HELD_APPLY_CANDIDATES = 4096

QUANT_TYPES: Mapping[str, int] = {
    "q4_0": C.LLAMA_FTYPE_MOSTLY_Q4_0,
    "q4_1": C.LLAMA_FTYPE_MOSTLY_Q4_1,
    "q5_0": C.LLAMA_FTYPE_MOSTLY_Q5_0,
    "q5_1": C.LLAMA_FTYPE_MOSTLY_Q5_1,
    "q8_0": C.LLAMA_FTYPE_MOSTLY_Q8_0,
    "q2_k": C.LLAMA_FTYPE_MOSTLY_Q2_K,
    "q3_k_m": C.LLAMA_FTYPE_MOSTLY_Q3_K_M,
    "q4_k_s": C.LLAMA_FTYPE_MOSTLY_Q4_K_S,
    "q4_k_m": C.LLAMA_FTYPE_MOSTLY_Q4_K_M,
    "q5_k_m": C.LLAMA_FTYPE_MOSTLY_Q5_K_M,
    "q6_k": C.LLAMA_FTYPE_MOSTLY_Q6_K,
    "f16": C.LLAMA_FTYPE_MOSTLY_F16,
}


def init_backend() -> None:
    """llama_backend_init, once per process."""
    global _backend_ready
    with _backend_lock:
        if not _backend_ready:
            C.llama_backend_init()
            C.llama_log_set(_SILENT_LOG, ctypes.c_void_p(0))
            # Compiled (or read from numba's cache) here, on the loading thread, never on a
            # decode thread's first step.
            shortlist.warm()
            _backend_ready = True


def gpu_offload_supported() -> bool:
    """Whether this llama.cpp build has a GPU backend that layers can be offloaded to."""
    return bool(C.llama_supports_gpu_offload())


@C.llama_log_callback  # type: ignore[untyped-decorator]
def _SILENT_LOG(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    # llama.cpp logs every tensor at load; our own JSON logs say what matters.
    return None


@dataclass(frozen=True)
class ModelMetadata:
    architecture: str
    context_length_train: int
    chat_template: str | None
    size_bytes: int
    n_params: int
    n_layer: int
    n_embd: int
    n_head_kv: int
    head_dim: int
    n_vocab: int
    description: str


class Model:
    """Loaded weights (llama_model) and their vocabulary; shared by the contexts over it."""

    def __init__(
        self,
        path: Path,
        *,
        vocab_only: bool = False,
        repack: bool = False,
        gpu_layers: int | None = None,
    ) -> None:
        init_backend()
        params = C.llama_model_default_params()
        params.vocab_only = vocab_only
        # None keeps llama.cpp's default: every layer on the GPU when the build has one.
        if gpu_layers is not None:
            if gpu_layers and not C.llama_supports_gpu_offload():
                raise FailedPrecondition(
                    f"{path.name}: gpu_layers={gpu_layers} asks for GPU offload, but this "
                    "llama.cpp build has no GPU backend (build it with -DGGML_CUDA=ON)",
                    field="gpu_layers",
                )
            params.n_gpu_layers = gpu_layers
        # The repacked CPU weight layout (llama-server's default) computes a token's logits
        # with other kernels when it shares the batch with 3 more (logits differ by up to 0.9);
        # the plain layout gives every sequence the same logits alone or batched, which the
        # same-seed guarantee needs.
        params.use_extra_bufts = repack
        ptr = C.llama_model_load_from_file(str(path).encode(), params)
        if not ptr:
            raise InvalidArgument(f"{path.name} is not a loadable GGUF model", field="path")
        self.ptr = ptr
        self.path = path
        self.vocab_only = vocab_only
        self.vocab = C.llama_model_get_vocab(ptr)
        self.n_vocab = int(C.llama_vocab_n_tokens(self.vocab))
        # llama.cpp puts the output layer on the GPU when every layer is offloaded (n_gpu_layers
        # < 0, its default, or more than the model's layers): then the logits live on the GPU.
        self.output_on_gpu = bool(
            not vocab_only
            and C.llama_supports_gpu_offload()
            and (params.n_gpu_layers < 0 or params.n_gpu_layers > C.llama_model_n_layer(ptr))
        )
        self.bos = int(C.llama_vocab_bos(self.vocab))
        self.eos = int(C.llama_vocab_eos(self.vocab))
        # One buffer per thread: the decode thread, the mask thread building llguidance's view
        # of the vocabulary and the event loop (detokenize) all read pieces of one model, and
        # another thread may run between a call and the copy of its bytes.
        self._piece_bufs = threading.local()

    def close(self) -> None:
        if self.ptr:
            C.llama_model_free(self.ptr)
            self.ptr = None

    def meta(self, key: str) -> str | None:
        buf = ctypes.create_string_buffer(1 << 16)
        n = C.llama_model_meta_val_str(self.ptr, key.encode(), buf, len(buf))
        if n < 0:
            return None
        if n >= len(buf):
            buf = ctypes.create_string_buffer(n + 1)
            C.llama_model_meta_val_str(self.ptr, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", "replace")

    def metadata(self) -> ModelMetadata:
        """Read from the GGUF key/values, which a vocab-only load has too (llama.cpp aborts on
        the hparam accessors when no tensors are loaded)."""
        arch = self.meta("general.architecture") or "unknown"

        def number(key: str, default: int = 0) -> int:
            value = self.meta(f"{arch}.{key}")
            try:
                return int(value) if value else default
            except ValueError:  # per-layer arrays: take the first entry
                return int(value.strip("[]").split(",")[0]) if value else default

        n_embd = number("embedding_length")
        n_head = number("attention.head_count", 1)
        template = self.meta("tokenizer.chat_template")
        return ModelMetadata(
            architecture=arch,
            context_length_train=number("context_length"),
            chat_template=template or None,
            size_bytes=0 if self.vocab_only else int(C.llama_model_size(self.ptr)),
            n_params=0 if self.vocab_only else int(C.llama_model_n_params(self.ptr)),
            n_layer=number("block_count"),
            n_embd=n_embd,
            n_head_kv=number("attention.head_count_kv", n_head),
            head_dim=number("attention.key_length", n_embd // max(1, n_head)),
            n_vocab=self.n_vocab,
            description=self.meta("general.name") or arch,
        )

    def tokenize(self, text: str, *, add_special: bool, parse_special: bool = True) -> list[int]:
        data = text.encode()
        capacity = len(data) + 16
        tokens = (C.llama_token * capacity)()
        n = C.llama_tokenize(
            self.vocab, data, len(data), tokens, capacity, add_special, parse_special
        )
        if n < 0:
            capacity = -n
            tokens = (C.llama_token * capacity)()
            n = C.llama_tokenize(
                self.vocab, data, len(data), tokens, capacity, add_special, parse_special
            )
        return list(tokens[:n])

    def piece(self, token: int, *, special: bool = False) -> bytes:
        """The bytes of one token; may be part of a UTF-8 character."""
        buf = getattr(self._piece_bufs, "buf", None)
        if buf is None:
            buf = self._piece_bufs.buf = ctypes.create_string_buffer(256)
        n = _token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        if n < 0:
            big = ctypes.create_string_buffer(-n)
            n = _token_to_piece(self.vocab, token, big, len(big), 0, special)
            return big.raw[:n]
        return buf.raw[:n]

    def token_text(self, token: int) -> str:
        return self.piece(token, special=True).decode("utf-8", "replace")

    def is_eog(self, token: int) -> bool:
        return bool(_vocab_is_eog(self.vocab, token))

    def token_attr(self, token: int) -> int:
        """llama.cpp's attribute bits of a token (LLAMA_TOKEN_ATTR_*)."""
        return int(_vocab_get_attr(self.vocab, token))

    def valid_token(self, token: int) -> bool:
        return 0 <= token < self.n_vocab


class LoraAdapter:
    """A LoRA adapter loaded against one model."""

    def __init__(self, model: Model, path: Path) -> None:
        ptr = C.llama_adapter_lora_init(model.ptr, str(path).encode())
        if not ptr:
            raise InvalidArgument(
                f"{path.name} is not a LoRA adapter for this model", field="adapter"
            )
        self.ptr = ptr
        self.path = path

    def close(self) -> None:
        if self.ptr:
            C.llama_adapter_lora_free(self.ptr)
            self.ptr = None


# Slots up to which a GPU context samples in the decode graph by default (ContextParams).
BACKEND_SAMPLING_AUTO_SLOTS = 1


@dataclass(frozen=True)
class ContextParams:
    n_seq: int
    n_ctx_per_seq: int
    n_batch: int = 512
    n_threads: int = 1
    embeddings: bool = False
    # llama.cpp's flash attention: None leaves it to llama.cpp (on where the backend has it).
    flash_attention: bool | None = None
    # Sampler chains that run inside the decode graph (`Context.attach`); None: only for a
    # context of one slot whose logits are computed on a GPU. Measured on an H100 (CUDA 13.0)
    # with llama.cpp's top-k patched to a radix select (docker/patches/; unpatched, CCCL 3.0
    # sorts all 262k logits of each row), top-k/top-p chains,
    # bench/results/gpu_engine_2026-12-06-radix.md: 1 stream 720 tok/s in the graph against 594
    # on the host; 16 streams a draw (2291 against 2330, 2035 against 1899 on another machine),
    # with twice the TTFT and ITL p99; 64 streams 2463 against 3692. The patch takes ~17 us a
    # row off the step; what remains is llama.cpp's one sampling subgraph per sequence (some 40
    # ops a row), and every change of the attached chains reserves the graph again. On a
    # CPU the graph's sampling ops are slower than the host's shortlist (8 streams: 61 ms a
    # step against 56).
    backend_sampling: bool | None = None


class Context:
    """A llama_context with n_seq sequence slots, each with its own KV stream.

    With backend sampling, a slot may have a sampler chain attached (`attach`): llama.cpp then
    samples that slot's output rows inside the decode graph and copies back only the token,
    not the row's logits. An attached chain is initialised for the graph; moving it to another
    slot, or back to the host, takes a clone of it (same parameters and RNG state).
    """

    def __init__(self, model: Model, params: ContextParams) -> None:
        cparams = C.llama_context_default_params()
        cparams.n_ctx = params.n_ctx_per_seq * params.n_seq
        cparams.n_seq_max = params.n_seq
        cparams.n_batch = params.n_batch
        cparams.n_ubatch = params.n_batch
        cparams.n_threads = params.n_threads
        cparams.n_threads_batch = params.n_threads
        cparams.kv_unified = False
        cparams.no_perf = True
        if params.flash_attention is not None:
            cparams.flash_attn_type = (
                C.LLAMA_FLASH_ATTN_TYPE_ENABLED
                if params.flash_attention
                else C.LLAMA_FLASH_ATTN_TYPE_DISABLED
            )
        if params.embeddings:
            cparams.embeddings = True
            cparams.pooling_type = C.LLAMA_POOLING_TYPE_MEAN
        backend = params.backend_sampling
        if backend is None:
            backend = model.output_on_gpu and params.n_seq <= BACKEND_SAMPLING_AUTO_SLOTS
        self.backend_sampling = backend and not params.embeddings
        if self.backend_sampling:
            # Every decode asks for at most one row per sequence (a prompt's last token, or
            # a decode step's): with that bound llama.cpp can run penalties in the graph, and
            # the RNG draws once per sampled token, as on the host.
            cparams.n_outputs_max_per_seq = 1
        ptr = C.llama_init_from_model(model.ptr, cparams)
        if not ptr:
            raise FailedPrecondition("llama.cpp could not create a context (out of memory?)")
        self.ptr = ptr
        self.model = model
        self.params = params
        self.memory = C.llama_get_memory(ptr)
        self.n_ctx_per_seq = int(C.llama_n_ctx_seq(ptr)) or params.n_ctx_per_seq
        self._adapters: tuple[tuple[int, float], ...] = ()
        # The chain attached to each slot: a running sequence's, or a finished one's that stays
        # until the slot's next output (detaching costs a graph reservation, as attaching does;
        # a slot reused by a sampled sequence then pays for one change, not two).
        self._chains: dict[int, Sampler] = {}
        # Whether the last decode's outputs were read once (`settle_outputs`): the reads after
        # that only look up rows and keep the GIL.
        self._settled = True

    def close(self) -> None:
        if self.ptr:
            C.llama_free(self.ptr)
            self.ptr = None
        for sampler in self._chains.values():
            sampler.slot = None
            if sampler.retired:
                sampler.close()
        self._chains.clear()

    def attach(self, slot: int, sampler: Sampler) -> bool:
        """Sample `slot`'s next outputs with `sampler`'s chain inside the decode graph (read
        with `Sampler.sample_many`). False, and nothing attached, when llama.cpp cannot run
        every sampler of the chain on the device that holds the logits; the chain then samples
        on the host. The graph is reserved again at the next decode when this changes it."""
        if self._chains.get(slot) is sampler:
            return True
        if sampler.slot is not None:  # its sequence moved to another slot
            self.detach(sampler.slot)
        sampler.fresh()
        sampler.initialised = True  # llama_set_sampler initialises the chain for the graph
        attached = bool(C.llama_set_sampler(self.ptr, slot, sampler.ptr))
        # llama.cpp replaced (or dropped) whatever chain the slot had.
        self._drop(slot)
        if attached and sampler.offloaded():
            self._chains[slot] = sampler
            sampler.slot = slot
            return True
        if attached:  # only a prefix of the chain runs on the device: all of it on the host
            C.llama_set_sampler(self.ptr, slot, None)
        sampler.fresh()
        return False

    def detach(self, slot: int) -> None:
        """Return `slot`'s outputs as logits again; its chain, if still in use, is ready for
        the host (or another slot)."""
        if slot in self._chains:
            C.llama_set_sampler(self.ptr, slot, None)
            self._drop(slot)

    def retire(self, sampler: Sampler) -> None:
        """The sequence of `sampler` ended: free it, or, while it is attached, leave it to
        its slot (inactive: no outputs there) until the slot's next output changes it."""
        if sampler.slot is None:
            sampler.close()
        else:
            sampler.retired = True

    def _drop(self, slot: int) -> None:
        sampler = self._chains.pop(slot, None)
        if sampler is None:
            return
        sampler.slot = None
        if sampler.retired:
            sampler.close()
        else:
            sampler.fresh()

    def decode(self, batch: Batch) -> None:
        self._settled = False
        rc = C.llama_decode(self.ptr, batch.raw)
        if rc != 0:
            raise Internal(f"llama_decode failed with {rc} for a batch of {batch.n} tokens")

    def clear_seq(self, seq: int) -> None:
        C.llama_memory_seq_rm(self.memory, seq, -1, -1)

    def move_seq(self, src: int, dst: int) -> None:
        """Move a sequence to another (empty) slot. Its KV cells keep their indices, so it
        computes exactly as before; llama.cpp copies the buffers at the start of the next
        decode, so nothing may write `src`'s slot until then."""
        C.llama_memory_seq_rm(self.memory, dst, -1, -1)
        C.llama_memory_seq_cp(self.memory, src, dst, -1, -1)
        C.llama_memory_seq_rm(self.memory, src, -1, -1)

    def copy_seq(self, src: int, dst: int) -> None:
        """Give slot `dst` a copy of `src`'s KV (a prompt's siblings share its prefill).
        Across KV streams llama.cpp copies the buffers at the start of the next decode: until
        then nothing may write either slot's buffers (a restored state would be overwritten)."""
        C.llama_memory_seq_rm(self.memory, dst, -1, -1)
        C.llama_memory_seq_cp(self.memory, src, dst, -1, -1)

    def seq_state(self, seq: int) -> bytes:
        """A copy of one sequence's KV state (llama.cpp's own format, for this model)."""
        size = int(C.llama_state_seq_get_size(self.ptr, seq))
        buf = (ctypes.c_uint8 * size)()
        n = int(C.llama_state_seq_get_data(self.ptr, buf, size, seq))
        return bytes(memoryview(buf)[:n])

    def set_seq_state(self, seq: int, state: bytes) -> bool:
        """Replace one sequence's KV with a saved state; False when llama.cpp refuses it."""
        self.clear_seq(seq)
        buf = (ctypes.c_uint8 * len(state)).from_buffer_copy(state)
        if int(C.llama_state_seq_set_data(self.ptr, buf, len(state), seq)) == 0:
            self.clear_seq(seq)
            return False
        return True

    def settle_outputs(self) -> None:
        """Wait for the last decode's outputs (on a GPU: for the graph to finish and the copy
        to the host) and put them in batch order. llama.cpp does it on the first read, which
        writes to the context; after this call, samplers on several threads only read, and
        every read keeps the GIL."""
        if not self._settled:
            C.llama_get_logits_ith(self.ptr, -1)  # lets go of the GIL while it waits
            self._settled = True

    def logits(self, index: int) -> npt.NDArray[np.float32]:
        self.settle_outputs()
        ptr = _get_logits_ith(self.ptr, index)
        return np.ctypeslib.as_array(ptr, shape=(self.model.n_vocab,))

    def sampled_token(self, index: int) -> int:
        """The token the decode graph sampled for batch index `index` (backend sampling)."""
        self.settle_outputs()
        return int(_get_sampled_token_ith(self.ptr, index))

    def logit_rows(self, indices: Sequence[int]) -> npt.NDArray[np.float32]:
        """The logits of these batch indices, one row each: a view of llama.cpp's buffer when
        their rows lie one after another there (a decode step's), else a copy."""
        n_vocab = self.model.n_vocab
        self.settle_outputs()
        first = _get_logits_ith(self.ptr, indices[0])
        if len(indices) > 1:
            last = _get_logits_ith(self.ptr, indices[-1])
            span = ctypes.addressof(last.contents) - ctypes.addressof(first.contents)
            consecutive = list(indices) == list(range(indices[0], indices[0] + len(indices)))
            if not consecutive or span != (len(indices) - 1) * n_vocab * 4:
                return np.stack([self.logits(i) for i in indices])
        return np.ctypeslib.as_array(first, shape=(len(indices), n_vocab))

    def embedding(self, seq: int) -> list[float]:
        ptr = C.llama_get_embeddings_seq(self.ptr, seq)
        if not ptr:
            raise Internal("llama.cpp returned no embedding")
        n_embd = int(C.llama_model_n_embd(self.model.ptr))
        return [float(v) for v in np.ctypeslib.as_array(ptr, shape=(n_embd,))]

    def set_adapters(self, adapters: Sequence[tuple[LoraAdapter, float]]) -> None:
        """Apply exactly these adapters to the next decodes (llama.cpp: per context, not per
        sequence, so the scheduler groups sequences by adapter)."""
        key = tuple((id(a), s) for a, s in adapters)
        if key == self._adapters:
            return
        n = len(adapters)
        ptrs = (C.llama_adapter_lora_p_ctypes * max(n, 1))(*[a.ptr for a, _ in adapters])
        scales = (ctypes.c_float * max(n, 1))(*[s for _, s in adapters])
        rc = C.llama_set_adapters_lora(self.ptr, ptrs if n else None, n, scales if n else None)
        if rc != 0:
            raise Internal(f"llama_set_adapters_lora failed with {rc}")
        self._adapters = key


class Batch:
    """A reusable llama_batch of up to `capacity` tokens, one sequence id per token."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.raw = C.llama_batch_init(capacity, 0, 1)
        self.n = 0

    def close(self) -> None:
        if self.capacity:
            C.llama_batch_free(self.raw)
            self.capacity = 0

    def clear(self) -> None:
        self.n = 0
        self.raw.n_tokens = 0

    def add(self, token: int, pos: int, seq: int, logits: bool) -> int:
        """Append one token; returns its index (for reading its logits)."""
        i = self.n
        raw = self.raw
        raw.token[i] = token
        raw.pos[i] = pos
        raw.n_seq_id[i] = 1
        raw.seq_id[i][0] = seq
        raw.logits[i] = logits
        self.n = i + 1
        raw.n_tokens = self.n
        return i

    def add_many(self, tokens: Sequence[int], start_pos: int, seq: int, last_logits: bool) -> int:
        """Append a run of one sequence's tokens; returns the index of the last."""
        for offset, token in enumerate(tokens):
            self.add(token, start_pos + offset, seq, last_logits and offset == len(tokens) - 1)
        return self.n - 1


@dataclass(frozen=True)
class SamplerConfig:
    temperature: float
    top_k: int
    top_p: float
    min_p: float
    repetition_penalty: float
    presence_penalty: float
    frequency_penalty: float
    seed: int
    logit_bias: Mapping[int, float]


_TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])
assert _TOKEN_DATA.itemsize == ctypes.sizeof(C.llama_token_data)
_TOKEN_DATA_P = ctypes.POINTER(C.llama_token_data)


def _token_data(
    ids: npt.NDArray[np.integer], logits: npt.NDArray[np.float32]
) -> npt.NDArray[np.void]:
    """A llama_token_data array of these candidates, p unset."""
    candidates = np.empty(ids.size, _TOKEN_DATA)
    candidates["id"] = ids
    candidates["logit"] = logits
    candidates["p"] = 0.0
    return candidates


class Sampler:
    """One sequence's llama.cpp sampler chain; its RNG state is the sequence's own.

    llama.cpp's `llama_sampler_sample` copies the whole vocabulary into a candidate array (262k
    entries for Gemma 3) before its first sampler runs; on a CPU that copy and the top-k pass
    over it cost most of a token's sampling, and they stream through memory, so threads barely
    help. When the chain starts by keeping the k best tokens (top_k, or greedy: k = 1), this
    hands llama.cpp only a shortlist that surely holds them (`_shortlists`): the same chain then
    picks the same token from a few dozen candidates. Chains that need the whole distribution
    (no top_k) take llama.cpp's own path.

    Attached to a slot of a context with backend sampling (`Context.attach`), the chain runs
    inside the decode graph instead, and only its token comes back.
    """

    PENALTY_WINDOW = 64
    # The wide shortlist's threshold comes from every n-th logit, n chosen so that this many of
    # them are read per kept token; about n_vocab / SAMPLE_PER_KEPT tokens pass it. A chain
    # that keeps more than n_vocab / (2 * SAMPLE_PER_KEPT) tokens takes llama.cpp's path.
    SAMPLE_PER_KEPT = 100
    # The tight shortlist splits a row into this many interleaved slices (token t in slice
    # t // (n_vocab / SLICES)): one elementwise maximum over them gives the best logit of each
    # of n_vocab / SLICES groups of tokens at memory speed.
    SLICES = 64
    # Rows a shortlist pass covers: their logits (1 MiB a row for Gemma 3) stay in cache.
    BLOCK_ROWS = 8

    def __init__(self, model: Model, config: SamplerConfig) -> None:
        chain = C.llama_sampler_chain_init(C.llama_sampler_chain_default_params())
        self.ptr = chain
        add: Callable[[Any], None] = lambda s: C.llama_sampler_chain_add(chain, s)  # noqa: E731
        # Tokens whose logits the chain moves before keeping the best: the shortlist must hold
        # them whatever their raw logits.
        self._moved = np.fromiter(config.logit_bias, np.int64)
        self._history: collections.deque[int] | None = None
        if config.logit_bias:
            biases = (C.llama_logit_bias * len(config.logit_bias))()
            for i, (token, bias) in enumerate(config.logit_bias.items()):
                biases[i].token = token  # type: ignore[assignment]
                biases[i].bias = bias
            add(C.llama_sampler_init_logit_bias(model.n_vocab, len(config.logit_bias), biases))
        if config.repetition_penalty != 1.0 or config.presence_penalty or config.frequency_penalty:
            add(
                C.llama_sampler_init_penalties(
                    model.n_vocab,
                    self.PENALTY_WINDOW,
                    config.repetition_penalty,
                    config.frequency_penalty,
                    config.presence_penalty,
                )
            )
            # The tokens llama.cpp's penalty window holds, kept here too.
            self._history = collections.deque(maxlen=self.PENALTY_WINDOW)
        self._keep = 0  # the chain's first pick keeps this many tokens; 0: it needs them all
        if config.temperature <= 0.0:
            add(C.llama_sampler_init_greedy())
            self._keep = 1
        else:
            if config.top_k > 0:
                add(C.llama_sampler_init_top_k(config.top_k))
                self._keep = config.top_k
            if config.top_p < 1.0:
                add(C.llama_sampler_init_top_p(config.top_p, 1))
            if config.min_p > 0.0:
                add(C.llama_sampler_init_min_p(config.min_p, 1))
            add(C.llama_sampler_init_temp(config.temperature))
            add(C.llama_sampler_init_dist(config.seed & 0xFFFFFFFF))
        if self._keep * 2 * self.SAMPLE_PER_KEPT > model.n_vocab:
            self._keep = 0  # a wide shortlist would be most of the vocabulary
        # The slot whose decode graph runs this chain (`Context.attach`); None: the host.
        self.slot: int | None = None
        # Set up for a decode graph by llama_set_sampler: the host skips those samplers then.
        self.initialised = False
        # Its sequence ended while attached: the context frees it.
        self.retired = False

    def fresh(self) -> None:
        """Replace a chain initialised for a decode graph with a clone that is not: the same
        samplers and state (RNG, penalty counts), usable on the host or attached again."""
        if self.initialised:
            clone = C.llama_sampler_clone(self.ptr)
            if not clone:
                raise Internal("llama_sampler_clone failed")
            C.llama_sampler_free(self.ptr)
            self.ptr = clone
            self.initialised = False

    def offloaded(self) -> bool:
        """Whether every sampler of the attached chain runs on the device (llama.cpp names a
        sampler '+name' when it does, '-name' when its device lacks an op)."""
        n = int(C.llama_sampler_chain_n(self.ptr))
        return all(
            (C.llama_sampler_name(C.llama_sampler_chain_get(self.ptr, i)) or b"").startswith(b"+")
            for i in range(n)
        )

    @property
    def shortlisted(self) -> bool:
        """Whether this chain samples from a shortlist rather than the whole vocabulary."""
        return self._keep > 0

    def accept_prompt(self, tokens: Iterable[int]) -> None:
        """Penalties look at the prompt too, as llama.cpp's server does."""
        for token in tokens:
            _sampler_accept(self.ptr, token)
            self._remember(token)

    def _remember(self, token: int) -> None:
        if self._history is not None:
            self._history.append(token)

    def sample(
        self, context: Context, index: int, mask: npt.NDArray[np.int32] | None = None
    ) -> int:
        return Sampler.sample_many(context, [(self, index)], masks=[mask])[0]

    @staticmethod
    def sample_many(
        context: Context,
        work: Sequence[tuple[Sampler, int]],
        pool: concurrent.futures.Executor | None = None,
        masks: Sequence[npt.NDArray[np.int32] | None] | None = None,
    ) -> list[int]:
        """Sample each (sampler, batch index) of the last decode, task by task (`_tasks`), the
        tasks spread over `pool`'s threads and this one. Each sampler has its own chain and RNG,
        so threads change no token. Both kinds of task let go of the GIL for most of their work
        (llama.cpp through ctypes; a block's compiled shortlist), but a block's fixed Python
        work holds it: smaller blocks on more threads end up waiting for the GIL (on a 16-core
        H100 host, 8 threads of 2 rows each sampled 16 streams no faster than one thread).

        `masks[i]`, when given and not None, is row i's bitmask of allowed tokens (bit t of
        word t // 32, llguidance's layout): that row samples only among them (`_keep_allowed`)
        and gets -1 when none is allowed. Masked rows form blocks of their own, so rows without
        a mask take exactly the path they take without any mask in the step.

        Rows of attached samplers (`Context.attach`) were sampled by the decode: their tokens
        are read and accepted here, and the rest take the host's path."""
        tokens = [0] * len(work)
        host = [i for i, (sampler, _) in enumerate(work) if sampler.slot is None]
        if len(host) < len(work):
            for i, (sampler, index) in enumerate(work):
                if sampler.slot is not None:
                    tokens[i] = sampler._sample_backend(context, index)
            if host:
                picked = Sampler.sample_many(
                    context,
                    [work[i] for i in host],
                    pool,
                    [masks[i] for i in host] if masks is not None else None,
                )
                for i, token in zip(host, picked, strict=True):
                    tokens[i] = token
            return tokens

        def run(task: list[int]) -> None:
            sampler, index = work[task[0]]
            mask = masks[task[0]] if masks is not None else None
            if not sampler.shortlisted:  # a task of one row
                if mask is None:
                    tokens[task[0]] = sampler._sample_full(context, index)
                else:
                    tokens[task[0]] = sampler._sample_allowed(context.logits(index), mask)
                return
            picked = Sampler._sample_block(
                context,
                [work[i] for i in task],
                [masks[i] for i in task] if mask is not None and masks is not None else None,
            )
            for i, token in zip(task, picked, strict=True):
                tokens[i] = token

        tasks = Sampler._tasks(work, masks)
        if pool is None or len(tasks) < 2:
            for task in tasks:
                run(task)
            return tokens
        context.settle_outputs()  # the threads then only read the outputs
        others = [pool.submit(run, task) for task in tasks[1:]]
        try:
            run(tasks[0])
        finally:
            # Never leave a sampler in use on another thread: a failed step frees them.
            concurrent.futures.wait(others)
        for future in others:
            future.result()
        return tokens

    @staticmethod
    def _tasks(
        work: Sequence[tuple[Sampler, int]],
        masks: Sequence[npt.NDArray[np.int32] | None] | None = None,
    ) -> list[list[int]]:
        """Indices into `work`: blocks of up to BLOCK_ROWS rows whose chains keep the same k
        best (one shortlist pass each; a decode step's rows are consecutive), masked rows and
        free ones in separate blocks, and every row on llama.cpp's full-vocabulary path (or
        among all its allowed tokens) alone."""
        blocks: dict[tuple[int, bool], list[int]] = {}
        alone: list[list[int]] = []
        for i, (sampler, _) in enumerate(work):
            masked = masks is not None and masks[i] is not None
            if sampler.shortlisted:
                blocks.setdefault((sampler._keep, masked), []).append(i)
            else:
                alone.append([i])
        size = Sampler.BLOCK_ROWS
        return [m[s : s + size] for m in blocks.values() for s in range(0, len(m), size)] + alone

    def _sample_backend(self, context: Context, index: int) -> int:
        """The token the decode graph sampled for this row, accepted by the chain (its
        penalty counts; the RNG drew inside the decode)."""
        token = context.sampled_token(index)
        if token < 0:
            raise Internal(f"llama.cpp sampled no token for output {index} on the device")
        _sampler_accept(self.ptr, token)
        self._remember(token)
        return token

    def _sample_full(self, context: Context, index: int) -> int:
        """llama.cpp's own path over the whole vocabulary."""
        token = int(C.llama_sampler_sample(self.ptr, context.ptr, index))  # and accepts it
        self._remember(token)
        return token

    def _moved_tokens(self) -> npt.NDArray[np.int64]:
        if self._history:  # repeats do no harm in the shortlist
            return np.concatenate((self._moved, np.fromiter(self._history, np.int64)))
        return self._moved

    @staticmethod
    def _sample_block(
        context: Context,
        work: Sequence[tuple[Sampler, int]],
        masks: Sequence[npt.NDArray[np.int32] | None] | None = None,
    ) -> list[int]:
        """Samplers that keep the same k best, each from a shortlist of its row (`_shortlists`),
        or with `masks` from the allowed tokens of it (`_keep_allowed`); rows whose sampled
        logits are not all finite take llama.cpp's path (among all allowed tokens if masked)."""
        rows = context.logit_rows([index for _, index in work])
        samplers = [sampler for sampler, _ in work]
        if masks is None and rows.shape[1] % Sampler.SLICES == 0:
            shortlists = Sampler._shortlists(samplers, rows)
        else:
            shortlists = Sampler._wide_shortlists(samplers, rows)
        if shortlists is None:
            return [
                sampler._sample_full(context, index)
                if masks is None or (mask := masks[i]) is None
                else sampler._sample_allowed(rows[i], mask)
                for i, (sampler, index) in enumerate(work)
            ]
        candidates, ends = shortlists
        given = [mask for mask in masks if mask is not None] if masks is not None else []
        masked = len(given) == len(work)  # a block of masked rows (never mixed with free ones)
        if masked:
            candidates, ends = Sampler._keep_allowed(candidates, ends, given)
        base = candidates.ctypes.data
        tokens = []
        start = 0
        for i, ((sampler, _), end) in enumerate(zip(work, ends, strict=True)):
            if masked and not sampler._enough_allowed(candidates[start:end]):
                tokens.append(sampler._sample_allowed(rows[i], given[i]))
            else:
                data = ctypes.cast(base + start * _TOKEN_DATA.itemsize, _TOKEN_DATA_P)
                cur = C.llama_token_data_array(data, end - start, -1, False)
                tokens.append(sampler._pick(cur))
            start = end
        return tokens

    @staticmethod
    def _keep_allowed(
        candidates: npt.NDArray[np.void],
        ends: list[int],
        masks: Sequence[npt.NDArray[np.int32]],
    ) -> tuple[npt.NDArray[np.void], list[int]]:
        """The block's shortlists cut down to the tokens each row's mask allows, in one pass
        over the whole block."""
        words = np.stack(masks)
        owner = np.repeat(np.arange(len(ends)), np.diff(ends, prepend=0))
        ids = candidates["id"].astype(np.int64)
        allowed = ((words[owner, ids >> 5] >> (ids & 31)) & 1).astype(bool)
        counts = np.bincount(owner[allowed], minlength=len(ends))
        return candidates[allowed], np.cumsum(counts).tolist()

    def _enough_allowed(self, shortlist: npt.NDArray[np.void]) -> bool:
        """Whether the allowed part of a row's unconstrained shortlist (threshold t) surely
        holds its chain's pick: with at least k allowed, unmoved tokens at or above t, an
        allowed unmoved token below t has k better ones and can never be kept (the moved ones
        are all in the shortlist). It does inside free text (a JSON string allows almost every
        token); where the grammar allows few tokens (structure, digits, keys), the row samples
        among all of them (`_sample_allowed`)."""
        unmoved = shortlist.size
        moved = self._moved_tokens()
        if moved.size:
            unmoved -= int(np.isin(shortlist["id"], moved).sum())
        return unmoved >= self._keep

    @staticmethod
    def _shortlists(
        samplers: Sequence[Sampler], rows: npt.NDArray[np.float32]
    ) -> tuple[npt.NDArray[np.void], list[int]] | None:
        """Candidates for each row, in token order, that surely include the row's `_keep` best
        after its chain's biases and penalties: a few more than k (k plus ties plus the moved
        tokens); the rows' candidates lie one after another, row i's ending at ends[i]. None
        when a row holds NaN or its threshold is not finite. n_vocab must be a multiple of
        SLICES. All samplers share one `_keep`.

        A row's tokens fall into n_vocab / SLICES groups, group j holding tokens j, j + width,
        j + 2 * width, ... One elementwise maximum of the row's SLICES slices gives each group's
        best logit, reading the row once with no per-token output (a threshold pass with a
        nonzero over the whole row cost 2 to 4 times more). Leaving out the groups that hold a
        token the chain moves, the k-th best group maximum, t, has k unmoved tokens at or above
        it (each group's best), so a token below t and not moved can never be among the k best.
        Only the groups whose maximum reaches t are read again: a row's candidates are their
        tokens at or above t, plus the moved ones. The block is one compiled call that lets go
        of the GIL (`shortlist.shortlists`).
        """
        moved_rows, moved_ids = Sampler._moved_by_row(samplers)
        found = shortlist.shortlists(rows, samplers[0]._keep, Sampler.SLICES, moved_rows, moved_ids)
        if found is None:
            return None
        ids, logits, ends = found
        return _token_data(ids, logits), ends

    @staticmethod
    def _wide_shortlists(
        samplers: Sequence[Sampler], rows: npt.NDArray[np.float32]
    ) -> tuple[npt.NDArray[np.void], list[int]] | None:
        """`_shortlists`' contract with about n_vocab / SAMPLE_PER_KEPT candidates a kept token:
        what masked rows need (most of a tight shortlist may be disallowed, while the allowed
        part of a wide one usually still holds k: `_enough_allowed`), and what a vocabulary
        that SLICES does not divide gets.

        Every stride-th logit is read, leaving out the tokens the chain moves; its k-th best,
        t, has at least k unmoved tokens at or above it, so a token below t and not moved can
        never be among the k best. A row's candidates are every token at or above t, plus the
        moved ones.
        """
        keep = samplers[0]._keep
        n_rows, n_vocab = rows.shape
        stride = n_vocab // (Sampler.SAMPLE_PER_KEPT * keep)
        moved_rows, moved_ids = Sampler._moved_by_row(samplers)
        sample = rows[:, ::stride]
        if moved_ids.size:
            sample = sample.copy()
            hit = moved_ids % stride == 0
            sample[moved_rows[hit], moved_ids[hit] // stride] = -np.inf
        kth = sample.shape[1] - keep
        thresholds = np.partition(sample, kth, axis=1)[:, kth]
        if not np.isfinite(thresholds).all():
            return None
        mask = rows >= thresholds[:, None]
        mask[moved_rows, moved_ids] = True
        flat = np.flatnonzero(mask)
        candidates = _token_data(flat % n_vocab, rows.reshape(-1)[flat])
        ends = np.searchsorted(flat, np.arange(1, n_rows + 1) * n_vocab).tolist()
        return candidates, ends

    @staticmethod
    def _moved_by_row(
        samplers: Sequence[Sampler],
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        """The tokens each row's chain moves, as (row, token) pairs in two arrays."""
        moved = [s._moved_tokens() for s in samplers]
        rows = np.repeat(np.arange(len(moved)), [m.size for m in moved])
        return rows, np.concatenate(moved)

    def _sample_allowed(self, row: npt.NDArray[np.float32], mask: npt.NDArray[np.int32]) -> int:
        """Pick among every token `mask` allows (found from its non-zero words); -1 when it
        allows none."""
        words = np.flatnonzero(mask)
        bits = np.unpackbits(mask[words].view(np.uint8), bitorder="little").reshape(-1, 32)
        word_rows, offsets = np.nonzero(bits)
        ids = words[word_rows] * 32 + offsets
        ids = ids[ids < row.shape[0]]
        if not ids.size:
            return -1
        return self._pick_from(_token_data(ids, row[ids]))

    def _pick_from(self, candidates: npt.NDArray[np.void]) -> int:
        """`_pick` over a candidate array that this call keeps alive (and contiguous)."""
        candidates = np.ascontiguousarray(candidates)
        data = ctypes.cast(candidates.ctypes.data, _TOKEN_DATA_P)
        return self._pick(C.llama_token_data_array(data, candidates.size, -1, False))

    def _pick(self, cur: Any) -> int:
        """Run the chain over `cur` (a llama_token_data_array) and accept its token."""
        apply = _sampler_apply if cur.size <= HELD_APPLY_CANDIDATES else C.llama_sampler_apply
        apply(self.ptr, ctypes.byref(cur))
        if not 0 <= cur.selected < cur.size:
            raise Internal(f"sampler chain selected {cur.selected} of {cur.size}")
        token = int(cur.data[cur.selected].id)
        _sampler_accept(self.ptr, token)
        self._remember(token)
        return token

    def close(self) -> None:
        if self.ptr:
            C.llama_sampler_free(self.ptr)
            self.ptr = None


def quantize(source: Path, target: Path, kind: str, n_threads: int) -> None:
    """Write a re-quantized copy of a GGUF (blocking; minutes for big models)."""
    ftype = QUANT_TYPES.get(kind.lower())
    if ftype is None:
        raise InvalidArgument(
            f"unknown quantization {kind!r} (known: {', '.join(sorted(QUANT_TYPES))})",
            field="quantization",
        )
    init_backend()
    params = C.llama_model_quantize_default_params()
    params.nthread = n_threads
    params.ftype = ftype
    params.allow_requantize = True
    rc = C.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params))
    if rc != 0:
        raise FailedPrecondition(f"quantizing {source.name} to {kind} failed ({rc})")
