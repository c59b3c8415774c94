"""Generates a real llama.cpp LoRA adapter GGUF for a base GGUF model, for tests.

The file has the layout llama.cpp's convert_lora_to_gguf.py writes and llama_adapter_lora_init
reads:

- metadata: general.architecture = the base model's, general.type = "adapter",
  adapter.type = "lora", adapter.lora.alpha = alpha (float32);
- for each adapted base weight W named "<name>" with ggml shape ne = [n_in, n_out]:
  "<name>.lora_a" with ne = [n_in, rank] and "<name>.lora_b" with ne = [rank, n_out]
  (numpy shapes (rank, n_in) and (n_out, rank)), so that W' = W + scale * (alpha / rank) * B @ A.

llama.cpp refuses an adapter whose architecture differs from the model's, whose A is not
[n_in, rank], or whose B is not [rank, n_out].
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import gguf
import numpy as np

# The attention query and value projections, as PEFT's default `target_modules` adapts them.
DEFAULT_TARGETS = ("attn_q", "attn_v")


def base_architecture(reader: gguf.GGUFReader) -> str:
    field = reader.fields["general.architecture"]
    value = field.contents()
    assert isinstance(value, str)
    return value


def make_lora_gguf(
    base_model_path: Path,
    out_path: Path,
    rank: int = 8,
    scale: float = 0.1,
    seed: int = 0,
    *,
    alpha: float | None = None,
    targets: Sequence[str] = DEFAULT_TARGETS,
    dtype: type[np.floating] = np.float32,
) -> Path:
    """Write a random LoRA adapter for every block's `targets` projections of the base model.

    A and B are Gaussian with standard deviation `scale`; with the default `alpha` (= rank) the
    applied update is B @ A. On the default model, scale 0.1 turns the greedy continuation of a
    short prompt into different text within a few tokens (0.02 barely moves it). `dtype` is
    np.float32 or np.float16.
    """
    if rank < 1:
        raise ValueError("rank must be at least 1")
    reader = gguf.GGUFReader(base_model_path)
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(out_path, base_architecture(reader))
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(rank if alpha is None else alpha))
    count = 0
    for tensor in reader.tensors:
        block, _, rest = tensor.name.partition(".")
        if block != "blk" or rest.split(".")[1] not in targets:
            continue
        # GGUFReader reports ggml order: ne[0] is the input width, ne[1] the output width.
        n_in, n_out = (int(d) for d in tensor.shape[:2])
        lora_a = rng.normal(0.0, scale, size=(rank, n_in)).astype(dtype)
        lora_b = rng.normal(0.0, scale, size=(n_out, rank)).astype(dtype)
        writer.add_tensor(f"{tensor.name}.lora_a", lora_a)
        writer.add_tensor(f"{tensor.name}.lora_b", lora_b)
        count += 1
    if count == 0:
        raise ValueError(f"{base_model_path} has no tensors named blk.N.{{{','.join(targets)}}}")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out_path
