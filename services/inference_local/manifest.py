"""The model manifest's arithmetic: each model's share of its tier's memory budget, and what a
new manifest changes against the one in force. No I/O; the engine measures and applies."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from inference_local.config import InferenceLocalConfig, ModelConfig
from slm.errors import FailedPrecondition

MB = 1 << 20


@dataclass(frozen=True)
class Budgets:
    """Bytes each tier may hold, and all of memory together."""

    resident: int
    standby: int
    total: int


def budgets_of(config: InferenceLocalConfig) -> Budgets:
    """The section's tier budgets in bytes; an unset one is memory_budget_mb."""
    total = config.memory_budget_mb * MB
    standby = config.standby_budget_mb
    return Budgets(
        (config.resident_budget_mb or config.memory_budget_mb) * MB,
        standby * MB if standby is not None else total,
        total,
    )


@dataclass(frozen=True)
class Share:
    """What one model of a manifest holds in its tier: weights (0 when another model of the tier
    already counts the same file), plus KV and compute for a resident one."""

    name: str
    tier: str
    weights_bytes: int
    context_bytes: int

    @property
    def total(self) -> int:
        return self.weights_bytes + self.context_bytes


@dataclass(frozen=True)
class Change:
    """Names of a manifest against the one in force."""

    added: tuple[str, ...]
    removed: tuple[str, ...]
    changed: tuple[str, ...]
    kept: tuple[str, ...]


def check_budgets(shares: Sequence[Share], budgets: Budgets) -> None:
    """Refuse, with each model's share, a manifest whose resident or standby models do not fit
    their tier's budget or together do not fit the memory budget."""
    sums = {
        tier: sum(s.total for s in shares if s.tier == tier) for tier in ("resident", "standby")
    }
    limits = {"resident": budgets.resident, "standby": budgets.standby}
    for tier, used in sums.items():
        if used > limits[tier]:
            raise FailedPrecondition(
                f"manifest refused: the {tier} tier needs {used / MB:.0f} MiB "
                f"({_itemised(shares, tier)}), its budget is {limits[tier] / MB:.0f} MiB",
                field="models",
                reason="TIER_BUDGET_EXCEEDED",
            )
    both = sums["resident"] + sums["standby"]
    if both > budgets.total:
        raise FailedPrecondition(
            f"manifest refused: resident ({sums['resident'] / MB:.0f} MiB) and standby "
            f"({sums['standby'] / MB:.0f} MiB) models need {both / MB:.0f} MiB together, the "
            f"memory budget is {budgets.total / MB:.0f} MiB",
            field="models",
            reason="TIER_BUDGET_EXCEEDED",
        )


def _itemised(shares: Sequence[Share], tier: str) -> str:
    return ", ".join(f"{s.name} {s.total / MB:.0f} MiB" for s in shares if s.tier == tier)


def diff(old: Mapping[str, ModelConfig], new: Sequence[ModelConfig]) -> Change:
    """Which names a manifest adds, removes, changes (their entry differs: reloaded) and keeps."""
    names = {m.name for m in new}
    added, changed, kept = [], [], []
    for entry in new:
        before = old.get(entry.name)
        if before is None:
            added.append(entry.name)
        elif before != entry:
            changed.append(entry.name)
        else:
            kept.append(entry.name)
    removed = tuple(name for name in old if name not in names)
    return Change(tuple(added), removed, tuple(changed), tuple(kept))
