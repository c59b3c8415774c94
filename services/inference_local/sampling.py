"""Sampling parameters, stop-string matching with hold-back, and log probabilities."""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from inference_local.llama_api import SamplerConfig
from slm.errors import InvalidArgument

DEFAULT_TEMPERATURE = 0.8
DEFAULT_TOP_P = 0.95
DEFAULT_TOP_K = 40
DEFAULT_MIN_P = 0.05
MAX_STOPS = 16
MAX_TOP_LOGPROBS = 20


@dataclass(frozen=True)
class Sampling:
    max_tokens: int | None = None
    temperature: float = DEFAULT_TEMPERATURE
    top_p: float = DEFAULT_TOP_P
    top_k: int = DEFAULT_TOP_K
    min_p: float = DEFAULT_MIN_P
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    logit_bias: Mapping[int, float] = field(default_factory=dict)
    logprobs: bool = False
    top_logprobs: int = 0

    def validate(self, n_vocab: int) -> None:
        def bad(name: str, rule: str) -> InvalidArgument:
            return InvalidArgument(f"{name} {rule}", field=f"sampling.{name}")

        if self.max_tokens is not None and self.max_tokens < 1:
            raise bad("max_tokens", "must be at least 1")
        if not 0.0 <= self.temperature <= 2.0:
            raise bad("temperature", "must be in [0, 2]")
        if not 0.0 < self.top_p <= 1.0:
            raise bad("top_p", "must be in (0, 1]")
        if self.top_k < 0:
            raise bad("top_k", "must be >= 0")
        if not 0.0 <= self.min_p <= 1.0:
            raise bad("min_p", "must be in [0, 1]")
        if self.repetition_penalty <= 0.0:
            raise bad("repetition_penalty", "must be > 0")
        if not -2.0 <= self.presence_penalty <= 2.0:
            raise bad("presence_penalty", "must be in [-2, 2]")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            raise bad("frequency_penalty", "must be in [-2, 2]")
        if len(self.stop) > MAX_STOPS or any(not s for s in self.stop):
            raise bad("stop", f"takes at most {MAX_STOPS} non-empty strings")
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise bad("top_logprobs", f"must be in [0, {MAX_TOP_LOGPROBS}]")
        for token, bias in self.logit_bias.items():
            if not 0 <= token < n_vocab:
                raise bad("logit_bias", f"names token {token}, outside the vocabulary")
            if not -100.0 <= bias <= 100.0:
                raise bad("logit_bias", "values must be in [-100, 100]")

    def sampler_config(self, index: int = 0) -> SamplerConfig:
        """The chain of choice `index`: with a seed, choice i draws from seed + i, so that the
        choices of one request differ and each is reproducible."""
        return SamplerConfig(
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            min_p=self.min_p,
            repetition_penalty=self.repetition_penalty,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            seed=self.seed + index if self.seed is not None else random.getrandbits(32),
            logit_bias=self.logit_bias,
        )

    @property
    def uses_penalties(self) -> bool:
        return bool(
            self.repetition_penalty != 1.0 or self.presence_penalty or self.frequency_penalty
        )


class StopMatcher:
    """Finds stop strings across token boundaries; text that may start one is held back.

    A partial stop string never reaches the client: if the stream ends, or turns out not to be a
    stop string, the held text is released.
    """

    def __init__(self, stops: tuple[str, ...]) -> None:
        self._stops = stops
        self._held = ""
        # The stop string that matched, once one has.
        self.matched = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Returns (text safe to send, whether a stop string matched)."""
        if not self._stops:
            return text, False
        held = self._held + text
        found = [(i, s) for s in self._stops if (i := held.find(s)) >= 0]
        if found:
            first, self.matched = min(found)
            self._held = ""
            return held[:first], True
        keep = 0
        for stop in self._stops:
            for k in range(min(len(stop) - 1, len(held)), keep, -1):
                if held.endswith(stop[:k]):
                    keep = k
                    break
        self._held = held[len(held) - keep :] if keep else ""
        return held[: len(held) - keep], False

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held


@dataclass(frozen=True)
class TopLogprob:
    token: str
    logprob: float
    bytes: bytes


@dataclass(frozen=True)
class TokenLogprob:
    token: str
    logprob: float
    bytes: bytes
    top: tuple[TopLogprob, ...]


def log_softmax_at(
    logits: npt.NDArray[np.float32], token: int, top: int
) -> tuple[float, list[tuple[int, float]]]:
    """The model's log probability of `token`, and the `top` most likely tokens with theirs."""
    peak = float(logits.max())
    lse = peak + float(np.log(np.exp(logits - peak, dtype=np.float64).sum()))
    chosen = float(logits[token]) - lse
    if top <= 0:
        return chosen, []
    best = np.argpartition(logits, -top)[-top:]
    best = best[np.argsort(-logits[best])]
    return chosen, [(int(t), float(logits[t]) - lse) for t in best]
