"""What co-activation saves a manifest's specialist: its time to first token after the router hop,
standby (cold: the request allocates its context), standby with co_activation naming the router
(made READY while the router runs) and resident, on the default model.

inference-local, the ledger and a Doorman run as gRPC servers in this process on `make run`'s
defaults, one inference-local and one Doorman per variant, all up at once: each inference-local
serves two models, the router (the bundled default model, as configured) and a specialist, a
copy of the same GGUF under another file name so that it shares no weights with the router.
The variants take turns trial by trial, so other load on the machine falls on each alike; after
each trial a standby specialist is put back to MAPPED (UnloadModel on a standby model drops its
context, keeps its weights). Phases:

- direct (--trials): the router is asked for an intent as the Doorman asks it (its prompt, one
  greedy token biased to the intents' first tokens), to completion, then the specialist is
  asked the question; the specialist's TTFT is from its Generate call to its first token, the
  alias's from the router's Generate call to that token.
- doorman (--trials): a chat for the manifest's alias through the Doorman, which routes it
  router -> specialist; its TTFT is from the Chat call to the first text event.
- probes (--probes): the router hop alone, then ListModels: the specialist's state right after
  the router (READY when the warming finished within the router hop).
- the specialist's engine metrics over the direct trials (slm_engine_model_load_seconds: the
  standby -> READY context allocation; load_wait; co_activations by outcome) and its memory
  MAPPED and READY, so the saving is explained by what the cold path pays.

It prints a table and writes JSON to --out.

    .venv/bin/python bench/coactivation.py
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from prometheus_client import CollectorRegistry

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from helpers import DEFAULT_MODEL, default_model_file, mesh_settings, runtime

from doorman.config import ManifestConfig, RoutingConfig
from doorman.routing import ROUTER_PROMPT
from inference_local.config import ModelConfig
from mesh.settings import Settings
from slm.server import GrpcService
from slm.v1 import (
    doorman_pb2,
    doorman_pb2_grpc,
    inference_pb2,
    inference_pb2_grpc,
    types_pb2,
)

RESULTS = Path(__file__).parent / "results"
MB = 1 << 20
SPECIALIST = "specialist"
ALIAS = "auto"
INTENTS = {"math": SPECIALIST, "poetry": SPECIALIST}


@dataclass(frozen=True)
class Variant:
    name: str
    tier: str
    co_activation: tuple[str, ...]
    # Whether the specialist is put back to MAPPED before each trial (a resident one never is).
    demote: bool


VARIANTS = (
    Variant("standby", "standby", (), True),
    Variant("standby+co_activation", "standby", (DEFAULT_MODEL,), True),
    Variant("resident", "resident", (), False),
)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def summary_ms(values: list[float]) -> dict[str, float]:
    return {
        "p50_ms": round(statistics.median(values) * 1000, 1),
        "p90_ms": round(percentile(values, 90) * 1000, 1),
        "min_ms": round(min(values) * 1000, 1),
        "max_ms": round(max(values) * 1000, 1),
    }


def question(trial: int) -> str:
    # Another question each trial, so no trial's prompt is a prefix another one left behind.
    return f"What is {12 + trial} times {7 + trial}?"


def port0(endpoint: Any) -> Any:
    return endpoint.model_copy(update={"port": 0, "metrics_port": 0})


class Driver:
    """Asks inference-local directly what the Doorman asks it for the alias."""

    def __init__(self, channel: grpc.aio.Channel, max_tokens: int) -> None:
        self.stub = inference_pb2_grpc.InferenceServiceStub(channel)
        self.max_tokens = max_tokens
        self._bias: dict[int, float] | None = None

    async def router_request(self, text: str) -> inference_pb2.GenerateRequest:
        """The router hop as doorman.routing.IntentClassifier builds it."""
        if self._bias is None:
            firsts: dict[int, float] = {}
            for intent in INTENTS:
                tokens = await self.stub.Tokenize(
                    inference_pb2.TokenizeRequest(
                        model=DEFAULT_MODEL, text=intent, add_special=False
                    )
                )
                firsts[tokens.tokens[0]] = 100.0
            # Intents sharing a first token cannot be told apart by one: the Doorman then
            # generates a few tokens unbiased.
            self._bias = firsts if len(firsts) == len(INTENTS) else {}
        sampling = types_pb2.SamplingParams(temperature=0.0, stop=["\n"])
        sampling.max_tokens = 1 if self._bias else 8
        sampling.logit_bias.update(self._bias)
        prompt = ROUTER_PROMPT.format(intents=", ".join(INTENTS), text=text)
        return inference_pb2.GenerateRequest(
            model=DEFAULT_MODEL,
            chat=types_pb2.ChatInput(
                messages=[types_pb2.ChatMessage(role=types_pb2.ROLE_USER, content=prompt)]
            ),
            sampling=sampling,
        )

    def specialist_request(self, text: str) -> inference_pb2.GenerateRequest:
        return inference_pb2.GenerateRequest(
            model=SPECIALIST,
            chat=types_pb2.ChatInput(
                messages=[types_pb2.ChatMessage(role=types_pb2.ROLE_USER, content=text)]
            ),
            sampling=types_pb2.SamplingParams(max_tokens=self.max_tokens, temperature=0),
        )

    async def router_hop(self, text: str) -> float:
        request = await self.router_request(text)
        started = time.perf_counter()
        async for _ in self.stub.Generate(request):
            pass
        return time.perf_counter() - started

    async def trial(self, text: str) -> dict[str, float]:
        """Router to completion, then the specialist: the hop's times in seconds."""
        request = await self.router_request(text)
        started = time.perf_counter()
        async for _ in self.stub.Generate(request):
            pass
        routed = time.perf_counter()
        first = None
        async for response in self.stub.Generate(self.specialist_request(text)):
            if first is None and response.HasField("delta"):
                first = time.perf_counter()
        ended = time.perf_counter()
        assert first is not None, "the specialist sent no token"
        return {
            "router_s": routed - started,
            "specialist_ttft_s": first - routed,
            "alias_ttft_s": first - started,
            "specialist_total_s": ended - routed,
        }

    async def settle(self) -> None:
        """One token from the specialist, which waits for any load of it in progress."""
        request = self.specialist_request("Hello.")
        request.sampling.max_tokens = 1
        async for _ in self.stub.Generate(request):
            pass

    async def info(self, name: str) -> types_pb2.ModelInfo:
        listed: inference_pb2.ListModelsResponse = await self.stub.ListModels(
            inference_pb2.ListModelsRequest()
        )
        for model in listed.models:
            if model.name == name:
                return model
        raise LookupError(f"{name} is not listed")

    async def state(self, name: str) -> str:
        return str(types_pb2.ModelState.Name((await self.info(name)).state))

    async def demote(self, name: str) -> None:
        """Put a standby model back to MAPPED: its context dropped, its weights kept."""
        await self.stub.UnloadModel(inference_pb2.UnloadModelRequest(name=name))
        state = await self.state(name)
        assert state == "MODEL_STATE_MAPPED", f"{name} is {state} after UnloadModel"


async def doorman_trial(
    stub: doorman_pb2_grpc.DoormanServiceStub, text: str, max_tokens: int
) -> dict[str, Any]:
    request = doorman_pb2.ChatRequest(
        model=ALIAS,
        messages=[types_pb2.ChatMessage(role=types_pb2.ROLE_USER, content=text)],
        sampling=types_pb2.SamplingParams(max_tokens=max_tokens, temperature=0),
    )
    started = time.perf_counter()
    first = None
    end = None
    async for response in stub.Chat(request):
        if first is None and response.HasField("delta"):
            first = time.perf_counter()
        if response.HasField("end"):
            end = response.end
    ended = time.perf_counter()
    assert first is not None, "the alias answered no token"
    assert end is not None, "the alias's stream had no end"
    hops = [hop.model for hop in end.hops]
    assert hops == [DEFAULT_MODEL, SPECIALIST], f"routed through {hops}"
    return {"e2e_ttft_s": first - started, "e2e_total_s": ended - started}


def specialist_metrics(registry: CollectorRegistry) -> dict[str, dict[str, float]]:
    """The specialist's slm_engine_model_* histograms (count, sum and mean seconds) and its
    co-activations by outcome."""
    found: dict[str, dict[str, float]] = {}
    for family in registry.collect():
        if family.type == "counter" and family.name == "slm_engine_co_activations":
            outcomes = {
                sample.labels["outcome"]: int(sample.value)
                for sample in family.samples
                if sample.labels.get("model") == SPECIALIST and sample.name.endswith("_total")
            }
            if outcomes:
                found[family.name] = dict(outcomes)
        if family.type != "histogram" or not family.name.startswith("slm_engine_model_"):
            continue
        totals: dict[str, float] = {}
        for sample in family.samples:
            if sample.labels.get("model") != SPECIALIST:
                continue
            for suffix in ("_count", "_sum"):
                if sample.name.endswith(suffix):
                    totals[suffix[1:]] = sample.value
        if totals.get("count"):
            found[family.name] = {
                "count": int(totals["count"]),
                "sum_s": round(totals["sum"], 4),
                "mean_ms": round(totals["sum"] / totals["count"] * 1000, 1),
            }
    return found


def since(
    after: dict[str, dict[str, float]], before: dict[str, dict[str, float]]
) -> dict[str, dict[str, float]]:
    """What `after` added to `before`, the means recomputed."""
    added: dict[str, dict[str, float]] = {}
    for name, values in after.items():
        old = before.get(name, {})
        if "count" in values and "sum_s" in values:
            count = values["count"] - old.get("count", 0)
            total = values["sum_s"] - old.get("sum_s", 0.0)
            if count:
                added[name] = {
                    "count": count,
                    "sum_s": round(total, 4),
                    "mean_ms": round(total / count * 1000, 1),
                }
        else:
            diff = {k: v - old.get(k, 0) for k, v in values.items() if v - old.get(k, 0)}
            if diff:
                added[name] = diff
    return added


@contextlib.asynccontextmanager
async def variant_mesh(
    settings: Settings,
    variant: Variant,
    specialist_file: Path,
    ledger: GrpcService,
    parallel: int | None,
) -> AsyncIterator[tuple[GrpcService, GrpcService]]:
    """inference-local with the router and this variant's specialist, and a Doorman whose
    manifest routes the alias through them."""
    from doorman.app import build_app as doorman_app
    from inference_local.app import build_app as inference_app

    router = settings.inference_local.models[0]
    assert router.name == DEFAULT_MODEL
    specialist = ModelConfig(
        name=SPECIALIST,
        path=str(specialist_file),
        chat_template=router.chat_template,
        tier=variant.tier,
        co_activation=list(variant.co_activation),
        parallel=parallel,
    )
    local = settings.inference_local.model_copy(
        update={
            "models": [router, specialist],
            "extra_models_dirs": [specialist_file.parent],
        }
    )
    registries = [CollectorRegistry() for _ in range(2)]
    async with GrpcService(
        "inference-local",
        inference_app(local, runtime(settings, registries[0])),
        port0(local.endpoint),
        settings.telemetry,
        registries[0],
    ) as inference:
        routing = RoutingConfig(
            manifests=[
                ManifestConfig(
                    alias=ALIAS, router_model=DEFAULT_MODEL, intents=INTENTS, fallback=SPECIALIST
                )
            ]
        )
        doorman = settings.doorman.model_copy(
            update={
                "inference_local": f"127.0.0.1:{inference.port}",
                "ledger": f"127.0.0.1:{ledger.port}",
                "routing": routing,
            }
        )
        async with GrpcService(
            "doorman",
            doorman_app(doorman, runtime(settings, registries[1])),
            port0(doorman.endpoint),
            settings.telemetry,
            registries[1],
        ) as service:
            yield inference, service


@dataclass
class Subject:
    """One variant's mesh in the run, and what was measured on it."""

    variant: Variant
    inference: GrpcService
    driver: Driver
    chat: doorman_pb2_grpc.DoormanServiceStub
    state_at_start: str = ""
    ready_mb: float = 0.0
    mapped_mb: float | None = None
    direct: list[dict[str, float]] = field(default_factory=list)
    through_doorman: list[dict[str, Any]] = field(default_factory=list)
    after_router: list[str] = field(default_factory=list)
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)

    async def demote(self) -> None:
        """Back to MAPPED after a trial, so a standby specialist holds no context while the
        other variants run."""
        if self.variant.demote:
            await self.driver.demote(SPECIALIST)
            self.mapped_mb = (await self.driver.info(SPECIALIST)).memory_bytes / MB

    async def expect_start_state(self) -> None:
        state = await self.driver.state(SPECIALIST)
        wanted = "MODEL_STATE_MAPPED" if self.variant.demote else "MODEL_STATE_READY"
        assert state == wanted, f"{self.variant.name}: the specialist is {state} before a trial"

    def row(self) -> dict[str, Any]:
        def column(rows: list[dict[str, Any]], key: str) -> dict[str, float]:
            return summary_ms([row[key] for row in rows])

        return {
            "variant": self.variant.name,
            "tier": self.variant.tier,
            "co_activation": list(self.variant.co_activation),
            "state_at_start": self.state_at_start,
            "specialist_ttft": column(self.direct, "specialist_ttft_s"),
            "router_hop": column(self.direct, "router_s"),
            "alias_ttft_direct": column(self.direct, "alias_ttft_s"),
            "doorman_e2e_ttft": column(self.through_doorman, "e2e_ttft_s"),
            "doorman_e2e_total": column(self.through_doorman, "e2e_total_s"),
            "state_after_router_hop": self.after_router,
            # The engine's estimate: weights alone (MAPPED), and with KV and compute (READY).
            "specialist_mapped_mb": None if self.mapped_mb is None else round(self.mapped_mb, 1),
            "specialist_ready_mb": round(self.ready_mb, 1),
            # The specialist's metrics over the direct trials alone.
            "engine_metrics": self.metrics,
            "direct_trials": self.direct,
            "doorman_trials": self.through_doorman,
        }


async def measure(subjects: list[Subject], args: argparse.Namespace) -> None:
    """Every phase trial by trial, the variants taking turns (in a rotating order), so that
    other load on the machine falls on all of them alike."""

    def turns(trial: int) -> list[Subject]:
        shift = trial % len(subjects)
        return subjects[shift:] + subjects[:shift]

    for subject in subjects:
        driver = subject.driver
        subject.state_at_start = await driver.state(SPECIALIST)
        # One untimed pass each way: the router's pages and the Doorman's intent constraint
        # (Tokenize, once per router) are then warm in every variant alike.
        await driver.trial(question(-1))
        await doorman_trial(subject.chat, question(-1), args.max_tokens)
        subject.ready_mb = (await driver.info(SPECIALIST)).memory_bytes / MB
        await subject.demote()
    before = [specialist_metrics(s.inference.registry) for s in subjects]
    for trial in range(args.trials):
        for subject in turns(trial):
            await subject.expect_start_state()
            subject.direct.append(await subject.driver.trial(question(trial)))
            await subject.demote()
    for subject, old in zip(subjects, before, strict=True):
        subject.metrics = since(specialist_metrics(subject.inference.registry), old)
    for trial in range(args.trials):
        for subject in turns(trial):
            await subject.expect_start_state()
            subject.through_doorman.append(
                await doorman_trial(subject.chat, question(trial), args.max_tokens)
            )
            await subject.demote()
    for trial in range(args.probes):
        for subject in turns(trial):
            await subject.expect_start_state()
            await subject.driver.router_hop(question(trial))
            subject.after_router.append(await subject.driver.state(SPECIALIST))
            # Wait the warming out: the demote, or the engine's shutdown, must not meet a
            # context still being allocated.
            await subject.driver.settle()
            await subject.demote()


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from ledger.app import build_app as ledger_app

    state_dir = Path(tempfile.mkdtemp(prefix="slm-bench-coactivation-"))
    try:
        # Another file, so the specialist's weights are its own, not the router's.
        specialist_dir = state_dir / "models"
        specialist_dir.mkdir()
        specialist_file = specialist_dir / "specialist-gemma-3-270m-q4_k_m.gguf"
        shutil.copyfile(default_model_file(), specialist_file)
        settings = mesh_settings(state_dir)
        registry = CollectorRegistry()
        async with contextlib.AsyncExitStack() as stack:
            ledger = await stack.enter_async_context(
                GrpcService(
                    "ledger",
                    ledger_app(settings.ledger, runtime(settings, registry)),
                    port0(settings.ledger.endpoint),
                    settings.telemetry,
                    registry,
                )
            )
            subjects = []
            for variant in (v for v in VARIANTS if v.name in args.variants):
                inference, doorman = await stack.enter_async_context(
                    variant_mesh(settings, variant, specialist_file, ledger, args.parallel)
                )
                local = await stack.enter_async_context(
                    grpc.aio.insecure_channel(f"127.0.0.1:{inference.port}")
                )
                channel = await stack.enter_async_context(
                    grpc.aio.insecure_channel(f"127.0.0.1:{doorman.port}")
                )
                subjects.append(
                    Subject(
                        variant,
                        inference,
                        Driver(local, args.max_tokens),
                        doorman_pb2_grpc.DoormanServiceStub(channel),
                    )
                )
            await measure(subjects, args)
        rows = [subject.row() for subject in subjects]
    finally:
        shutil.rmtree(state_dir, ignore_errors=True)
    print(HEADER)
    for row in rows:
        print_row(row)
    return {
        "machine": platform.machine(),
        "date": datetime.date.today().isoformat(),
        "trials": args.trials,
        "probes": args.probes,
        "max_tokens": args.max_tokens,
        "specialist_parallel": args.parallel,
        "rows": rows,
    }


HEADER = (
    f"{'variant':22s} {'specialist TTFT':>17s} {'router hop':>10s} {'alias TTFT':>10s}"
    f" {'Doorman alias TTFT':>18s} {'READY after':>11s}\n"
    f"{'':22s} {'p50 / p90 ms':>17s} {'p50 ms':>10s} {'p50 ms':>10s}"
    f" {'p50 / p90 ms':>18s} {'router hop':>11s}"
)


def print_row(row: dict[str, Any]) -> None:
    ttft, e2e = row["specialist_ttft"], row["doorman_e2e_ttft"]
    probes = row["state_after_router_hop"]
    ready = f"{sum(s == 'MODEL_STATE_READY' for s in probes)}/{len(probes)}"
    print(
        f"{row['variant']:22s} {ttft['p50_ms']:7.0f} / {ttft['p90_ms']:7.0f}"
        f" {row['router_hop']['p50_ms']:10.0f} {row['alias_ttft_direct']['p50_ms']:10.0f}"
        f" {e2e['p50_ms']:8.0f} / {e2e['p90_ms']:7.0f}"
        f" {ready:>11s}"
    )
    metrics = ", ".join(
        f"{name.removeprefix('slm_engine_model_')} {m['count']}x mean {m['mean_ms']:.0f} ms"
        if "mean_ms" in m
        else f"co_activations {m}"
        for name, m in row["engine_metrics"].items()
    )
    memory = f"READY {row['specialist_ready_mb']:.0f} MiB"
    if row["specialist_mapped_mb"] is not None:
        memory += f", MAPPED {row['specialist_mapped_mb']:.0f} MiB"
    print(f"{'':22s} direct trials: {metrics or 'no loads'}; specialist {memory}")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--probes", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=8, help="the specialist's answer")
    parser.add_argument(
        "--parallel",
        type=int,
        default=None,
        help="the specialist's sequence slots (default: inference_local.parallel, as make run)",
    )
    parser.add_argument(
        "--variants",
        nargs="+",
        default=[v.name for v in VARIANTS],
        choices=[v.name for v in VARIANTS],
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=RESULTS / f"coactivation_{datetime.date.today().isoformat()}.json",
    )
    args = parser.parse_args()
    results = asyncio.run(run(args))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"\nJSON: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
