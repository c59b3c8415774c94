"""One model's slots in one llama.cpp context against the same slots split over several
(`decode_contexts`), the Engine in this process, side by side.

At each level of concurrent streams (--levels), an Engine per entry of --contexts loads the
default model with `parallel` equal to the streams, split over that many contexts (each with its
own decode thread), and they take turns, every other round in reverse order (--repeat rounds;
the median run is kept). The requests, their statistics and the in-process Engine are
bench/batching.py's (interleaved, direct_engine). On a CUDA build every layer goes
to the GPU (bench/gpu_engine.py describes the device setup), elsewhere none; --gpu-layers sets
it. SWITCH_INTERVAL (seconds) sets the interpreter's GIL switch interval first, to see how much
of a step is spent waiting for the GIL.

    .venv/bin/python bench/decode_contexts.py --levels 4 --contexts 1 2 --max-tokens 64
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import json
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "services"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

# Imported by name, as bench/gpu_engine.py does, so that mypy on this file alone does not
# follow into batching.py.
batching: Any = importlib.import_module("batching")


async def run_all(args: argparse.Namespace) -> dict[str, Any]:
    from inference_local.config import (  # type: ignore[import-not-found, unused-ignore]
        InferenceLocalConfig,
    )

    results: dict[str, Any] = {
        "switch_interval_s": sys.getswitchinterval(),
        "max_tokens": args.max_tokens,
        "gpu_layers": args.gpu_layers,
        "levels": {},
    }
    for c in args.levels:
        async with contextlib.AsyncExitStack() as stack:
            engines = {}
            for k in args.contexts:
                base = InferenceLocalConfig(models_dir=Path(args.model).parent)
                entry = base.models[0].model_copy(
                    update={
                        "path": Path(args.model).name,
                        "parallel": c,
                        "context_length": args.ctx,
                        "gpu_layers": args.gpu_layers,
                        "decode_contexts": k,
                    }
                )
                config = base.model_copy(update={"models": [entry]})
                engine = await stack.enter_async_context(batching.direct_engine(config))
                engines[f"contexts={k}"] = engine
            medians = await batching.interleaved(engines, c, args.max_tokens, args.repeat)
            results["levels"][str(c)] = {
                name.removeprefix("contexts="): r for name, r in medians.items()
            }
    return results


def main() -> None:
    if os.environ.get("SWITCH_INTERVAL"):
        sys.setswitchinterval(float(os.environ["SWITCH_INTERVAL"]))
    from inference_local.llama_api import (  # type: ignore[import-not-found, unused-ignore]
        gpu_offload_supported,
    )

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="default: the bundled model")
    parser.add_argument("--levels", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--contexts", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--ctx", type=int, default=512, help="context per sequence")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--gpu-layers", type=int, default=None, help="default: all on a GPU")
    parser.add_argument("--out", type=Path, default=None, help="JSON of the results")
    args = parser.parse_args()
    if args.gpu_layers is None:
        args.gpu_layers = -1 if gpu_offload_supported() else 0
    if args.model is None:
        args.model = str(batching.default_model_file())
    results = asyncio.run(run_all(args))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
