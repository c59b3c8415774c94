"""The generated LoRA GGUF is a real llama.cpp adapter: it loads and changes greedy output."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
from lora_fixture import make_lora_gguf

PROMPT = "The capital of France is"


def greedy(model_path: Path, **kwargs: Any) -> str:
    import llama_cpp

    llama = llama_cpp.Llama(model_path=str(model_path), n_ctx=256, verbose=False, **kwargs)
    try:
        out = llama.create_completion(PROMPT, max_tokens=12, temperature=0.0)
        return str(out["choices"][0]["text"])  # type: ignore[index]
    finally:
        llama.close()


def test_adapter_metadata_and_shapes(model_path: Path, tmp_path: Path) -> None:
    path = make_lora_gguf(model_path, tmp_path / "a.gguf", rank=4, seed=3, dtype=np.float16)
    reader = gguf.GGUFReader(path)
    assert reader.fields["general.type"].contents() == "adapter"
    assert reader.fields["general.architecture"].contents() == "gemma3"
    assert reader.fields["adapter.type"].contents() == "lora"
    assert reader.fields["adapter.lora.alpha"].contents() == pytest.approx(4.0)
    tensors = {t.name: t for t in reader.tensors}
    lora_a, lora_b = tensors["blk.0.attn_q.weight.lora_a"], tensors["blk.0.attn_q.weight.lora_b"]
    # ggml order: A is [n_in, rank], B is [rank, n_out], as llama.cpp requires.
    assert [int(d) for d in lora_a.shape] == [640, 4]
    assert [int(d) for d in lora_b.shape] == [4, 1024]
    assert lora_a.tensor_type == gguf.GGMLQuantizationType.F16
    assert "blk.0.attn_v.weight.lora_a" in tensors
    assert not any(".attn_k." in name for name in tensors)


def test_llama_cpp_loads_adapter_and_output_changes(model_path: Path, tmp_path: Path) -> None:
    adapter = make_lora_gguf(model_path, tmp_path / "lora.gguf", seed=1)
    base = greedy(model_path)
    adapted = greedy(model_path, lora_path=str(adapter))
    assert adapted != base
    # The same adapter at scale 0 is the base model again.
    assert greedy(model_path, lora_path=str(adapter), lora_scale=0.0) == base


def test_seed_determines_the_file(model_path: Path, tmp_path: Path) -> None:
    first = make_lora_gguf(model_path, tmp_path / "1.gguf", seed=7).read_bytes()
    second = make_lora_gguf(model_path, tmp_path / "2.gguf", seed=7).read_bytes()
    other = make_lora_gguf(model_path, tmp_path / "3.gguf", seed=8).read_bytes()
    assert first == second
    assert first != other
