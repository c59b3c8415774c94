"""llguidance against xgrammar on the default model's 262k-token vocabulary: the measurements
behind the choice of grammar engine for constrained decoding.

Both engines get the same vocabulary, read from the GGUF (SentencePiece pieces turned into
their bytes, control tokens marked special) and the same ten-field JSON schema, compact (no
free whitespace). For each engine: the vocabulary setup (once per model), the schema's compile,
the time to its first mask (compile + matcher + first mask), and the per-token mask time (p50,
p99) along a valid document of that schema, tokenized greedily with the same vocabulary.

xgrammar's wheel needs torch (and pulls transformers and triton), so it is measured from a
scratch environment outside the project; an engine that cannot be imported is skipped with the
reason. Run it with each interpreter:

    .venv/bin/python bench/grammar_engines.py
    /tmp/xg/bin/python bench/grammar_engines.py     # a venv with xgrammar, numpy and gguf
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"
MODEL_FILE = "gemma-3-270m-q4_k_m.gguf"
# gguf's token types (llama.cpp's llama_token_type).
CONTROL, BYTE = 3, 6


def ten_field_schema(tag: str) -> dict[str, Any]:
    properties: dict[str, Any] = {
        f"field_{i}": {"type": "string", "maxLength": 64} for i in range(6)
    }
    properties["kind"] = {"type": "string", "enum": ["alpha", "beta", "gamma"]}
    properties["count"] = {"type": "integer", "minimum": 0, "maximum": 1000}
    properties["score"] = {"type": "number"}
    properties["tags"] = {"type": "array", "items": {"type": "string"}, "maxItems": 4}
    return {
        "type": "object",
        "description": tag,  # a new text each round, so no compile comes from a cache
        "properties": properties,
        "required": list(properties),
        "additionalProperties": False,
    }


DOCUMENT = {
    **{f"field_{i}": f"value number {i} of the record" for i in range(6)},
    "kind": "beta",
    "count": 42,
    "score": 3.5,
    "tags": ["red", "green"],
}


def vocabulary(path: Path) -> tuple[list[bytes], list[int], list[int]]:
    """(token bytes, special token ids, end-of-generation ids) from the GGUF."""
    import gguf

    reader = gguf.GGUFReader(str(path))

    def strings(key: str) -> list[bytes]:
        field = reader.fields[key]
        return [bytes(field.parts[i]) for i in field.data]

    def ints(key: str) -> list[int]:
        field = reader.fields[key]
        return [int(field.parts[i][0]) for i in field.data]

    def scalar(key: str) -> int | None:
        field = reader.fields.get(key)
        return int(field.parts[field.data[0]][0]) if field is not None else None

    pieces = strings("tokenizer.ggml.tokens")
    types = ints("tokenizer.ggml.token_type")
    tokens, special = [], []
    for i, (piece, kind) in enumerate(zip(pieces, types, strict=True)):
        if kind == BYTE:  # <0x0A>
            tokens.append(bytes([int(piece[3:5], 16)]))
        elif kind == CONTROL:
            tokens.append(piece)
            special.append(i)
        else:
            tokens.append(piece.replace("\u2581".encode(), b" "))
    eos = [
        t for t in (scalar("tokenizer.ggml.eos_token_id"), scalar("tokenizer.ggml.eot_token_id"))
    ]
    stops = sorted({t for t in eos if t is not None} | {pieces.index(b"<end_of_turn>")})
    return tokens, special, stops


def greedy_tokens(tokens: list[bytes], special: list[int], text: bytes) -> list[int]:
    """Longest match first: a valid tokenization (not the model's own), the same for both."""
    skip = set(special)
    index = {piece: i for i, piece in enumerate(tokens) if piece and i not in skip}
    longest = max(len(p) for p in index)
    out, at = [], 0
    while at < len(text):
        for size in range(min(longest, len(text) - at), 0, -1):
            token = index.get(text[at : at + size])
            if token is not None:
                out.append(token)
                at += size
                break
        else:
            raise ValueError(f"no token for {text[at : at + 1]!r}")
    return out


def measure(
    setup: Callable[[], Any],
    compile_schema: Callable[[Any, str], Any],
    first_mask: Callable[[Any], Any],
    step: Callable[[Any, int], None],
    document: list[int],
    rounds: int,
) -> dict[str, float]:
    started = time.perf_counter()
    state = setup()
    setup_s = time.perf_counter() - started
    compiles, firsts = [], []
    for i in range(rounds):
        schema = json.dumps(ten_field_schema(f"round {i}"))
        started = time.perf_counter()
        compiled = compile_schema(state, schema)
        middle = time.perf_counter()
        matcher = first_mask(compiled)
        done = time.perf_counter()
        compiles.append((middle - started) * 1e3)
        firsts.append((done - started) * 1e3)
    per_token = []
    for token in document:
        started = time.perf_counter()
        step(matcher, token)
        per_token.append((time.perf_counter() - started) * 1e3)
    per_token.sort()
    return {
        "vocabulary_setup_s": setup_s,
        "compile_ms_p50": statistics.median(compiles),
        "first_mask_ms_p50": statistics.median(firsts),
        "mask_ms_p50": statistics.median(per_token),
        "mask_ms_p99": per_token[int(0.99 * (len(per_token) - 1))],
        "document_tokens": len(document),
    }


def bench_llguidance(path: Path, vocab: tuple[list[bytes], list[int], list[int]],
                     document: list[int], rounds: int) -> dict[str, Any]:  # fmt: skip
    import llguidance
    import llguidance.numpy as lgn
    import numpy as np

    tokens = vocab[0]

    def setup() -> Any:
        # The production path: inference-local's own vocabulary from llama.cpp (which also
        # gives llguidance llama.cpp's tokenizer, for text it must read).
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "services"))
        from inference_local.constraints import _tokenizer  # type: ignore[import-not-found, unused-ignore]
        from inference_local.llama_api import Model  # type: ignore[import-not-found, unused-ignore]

        model = Model(path, vocab_only=True)
        assert model.n_vocab == len(tokens)
        return _tokenizer(model)

    def compile_schema(tokenizer: Any, schema: str) -> Any:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(
            schema, defaults={"whitespace_flexible": False}
        )
        matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
        assert not matcher.is_error(), matcher.get_error()
        return matcher

    bitmask = lgn.allocate_token_bitmask(1, len(tokens))

    def first_mask(matcher: Any) -> Any:
        lgn.fill_next_token_bitmask(matcher, bitmask)
        return matcher

    def step(matcher: Any, token: int) -> None:
        assert matcher.consume_token(token), matcher.get_error()
        lgn.fill_next_token_bitmask(matcher, bitmask)
        assert np.any(bitmask)

    result: dict[str, Any] = measure(setup, compile_schema, first_mask, step, document, rounds)
    result["version"] = importlib.metadata.version("llguidance")
    return result


def bench_xgrammar(path: Path, vocab: tuple[list[bytes], list[int], list[int]],
                   document: list[int], rounds: int) -> dict[str, Any]:  # fmt: skip
    import xgrammar as xgr  # type: ignore[import-not-found, unused-ignore]

    tokens, _, stops = vocab

    def setup() -> Any:
        info = xgr.TokenizerInfo(
            encoded_vocab=tokens,
            vocab_type=xgr.VocabType.RAW,
            vocab_size=len(tokens),
            stop_token_ids=stops,
            add_prefix_space=False,
        )
        return xgr.GrammarCompiler(info, cache_enabled=False), info

    def compile_schema(state: Any, schema: str) -> Any:
        compiler, info = state
        return (
            compiler.compile_json_schema(schema, any_whitespace=False, separators=(",", ":")),
            info,
        )

    def first_mask(compiled: Any) -> Any:
        grammar, info = compiled
        matcher = xgr.GrammarMatcher(grammar)
        bitmask = xgr.allocate_token_bitmask(1, info.vocab_size)
        matcher.fill_next_token_bitmask(bitmask)
        return matcher, bitmask

    def step(state: Any, token: int) -> None:
        matcher, bitmask = state
        assert matcher.accept_token(token)
        matcher.fill_next_token_bitmask(bitmask)

    result: dict[str, Any] = measure(setup, compile_schema, first_mask, step, document, rounds)
    result["version"] = importlib.metadata.version("xgrammar")
    return result


ENGINES = {"llguidance": bench_llguidance, "xgrammar": bench_xgrammar}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, help="a GGUF (default: the bundled model's)")
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    path = args.model or Path("~/.cache/service-slm/models").expanduser() / MODEL_FILE
    started = time.perf_counter()
    vocab = vocabulary(path)
    print(f"vocabulary: {len(vocab[0])} tokens read in {time.perf_counter() - started:.1f} s")
    document = greedy_tokens(
        vocab[0], vocab[1], json.dumps(DOCUMENT, separators=(",", ":")).encode()
    )
    results: dict[str, Any] = {}
    for name, bench in ENGINES.items():
        try:
            importlib.import_module(name)
        except ImportError as error:
            print(f"{name}: skipped, not importable here ({error})")
            results[name] = {"skipped": str(error)}
            continue
        results[name] = bench(path, vocab, document, args.rounds)
        print(f"{name} {results[name]['version']}:")
        for key, value in results[name].items():
            if key != "version":
                print(f"  {key:<20} {value:10.3f}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"grammar_engines.{Path(sys.executable).parent.parent.name.lstrip('.')}.json"
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
