"""What every reward returns, and the reward function types (no task logic here)."""
from __future__ import annotations

import dataclasses
from typing import Callable, Mapping, Sequence

Gold = Sequence[str] | str


@dataclasses.dataclass(frozen=True)
class RewardResult:
    score: float            # the outcome reward used for advantages
    f1: float               # token F1 (QA) or correctness (math)
    em: float               # normalised exact match (QA) or correctness (math)
    malformed: bool
    extracted: str | None   # the answer string compared with the gold
    parts: Mapping[str, float] = dataclasses.field(default_factory=dict)  # named parts, logged


RewardFn = Callable[[str, Gold], RewardResult]
StepRewardFn = Callable[[str, Gold, int], RewardResult]   # (text, gold, RL step)
MALFORMED = RewardResult(score=0.0, f1=0.0, em=0.0, malformed=True, extracted=None)
