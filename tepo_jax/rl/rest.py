"""ResT token weights (arXiv 2509.21826): reweight the per-token policy gradient by role.

Early in training structure (format tags, tool names) carries more weight, later reasoning
(free reasoning text, tool arguments, answer content) does: the weights of each role move from
`start` to `end` along a schedule over `total_steps`. Tool ARGUMENTS count as reasoning because
they are the semantic content of a call (which query, which code); the tool NAME and the tags
are structure that is learned early and then only needs to be kept.

The entropy variant (source=ENTROPY) ignores the span roles: a model token is "high-entropy"
when its sampler entropy is strictly above the `entropy_quantile` quantile of the batch's
model-token entropies, otherwise "low-entropy"; the two classes get their own scheduled weights
(low-entropy tokens are the structural ones in ResT's analysis).

After weighting, weights are rescaled to mean 1 over the batch's model tokens, so the loss
(a weighted token mean) keeps its scale; non-model tokens always get weight 0.
All functions are pure numpy and work elementwise on arrays of any shape (flat or [B, T]).
All default weights are ours; the ResT paper's exact values were not verified offline.
"""
from __future__ import annotations

import dataclasses
import enum
import math
from typing import Sequence

import numpy as np

from tepo_jax.rollout.trajectory import TokenRole, Trajectory, model_mask


class RoleSource(enum.Enum):
    SPANS = "spans"        # roles from the rollout's spans (Trajectory.roles)
    ENTROPY = "entropy"    # low- vs high-entropy tokens by a batch quantile


class Schedule(enum.Enum):
    CONSTANT = "constant"  # always the start weights
    LINEAR = "linear"
    COSINE = "cosine"      # slow start and end, fastest at mid-training


@dataclasses.dataclass(frozen=True)
class RoleWeights:
    reasoning: float = 1.0
    format: float = 1.0
    tool_name: float = 1.0
    tool_args: float = 1.0
    answer_content: float = 1.0

    def table(self) -> np.ndarray:
        """float64[len(TokenRole)], indexed by role id; NONE -> 0."""
        t = np.zeros(len(TokenRole), dtype=np.float64)
        t[TokenRole.REASONING] = self.reasoning
        t[TokenRole.FORMAT] = self.format
        t[TokenRole.TOOL_NAME] = self.tool_name
        t[TokenRole.TOOL_ARGS] = self.tool_args
        t[TokenRole.ANSWER_CONTENT] = self.answer_content
        return t


@dataclasses.dataclass(frozen=True)
class EntropyWeights:
    low: float = 1.0
    high: float = 1.0

    def table(self) -> np.ndarray:
        return np.array([self.low, self.high], dtype=np.float64)   # index: is_high


@dataclasses.dataclass(frozen=True)
class RestConfig:
    source: RoleSource = RoleSource.SPANS
    schedule: Schedule = Schedule.LINEAR
    total_steps: int = 1000
    start: RoleWeights = RoleWeights(reasoning=1.0, format=2.0, tool_name=2.0,
                                     tool_args=1.0, answer_content=1.0)
    end: RoleWeights = RoleWeights(reasoning=1.5, format=0.5, tool_name=0.5,
                                   tool_args=1.5, answer_content=1.5)
    entropy_quantile: float = 0.8
    entropy_start: EntropyWeights = EntropyWeights(low=2.0, high=1.0)
    entropy_end: EntropyWeights = EntropyWeights(low=0.5, high=1.5)

    def __post_init__(self):
        object.__setattr__(self, "source", RoleSource(self.source))
        object.__setattr__(self, "schedule", Schedule(self.schedule))
        if self.total_steps <= 0:
            raise ValueError(f"total_steps must be > 0, got {self.total_steps}")
        if not 0.0 <= self.entropy_quantile <= 1.0:
            raise ValueError(f"entropy_quantile must be in [0, 1], got {self.entropy_quantile}")
        for w in (self.start, self.end, self.entropy_start, self.entropy_end):
            if (w.table() < 0).any():
                raise ValueError(f"ResT weights must be >= 0: {w}")


def schedule_progress(step: int, config: RestConfig) -> float:
    """s in [0, 1]: 0 at step 0, 1 at and after total_steps."""
    p = min(max(step / config.total_steps, 0.0), 1.0)
    if config.schedule is Schedule.CONSTANT:
        return 0.0
    if config.schedule is Schedule.COSINE:
        return 0.5 * (1.0 - math.cos(math.pi * p))
    return p


def _interpolate(start: np.ndarray, end: np.ndarray, s: float) -> np.ndarray:
    return (1.0 - s) * start + s * end


def role_weight_table(step: int, config: RestConfig) -> np.ndarray:
    """float64[len(TokenRole)]: the scheduled (unnormalised) weight of each role at `step`."""
    return _interpolate(config.start.table(), config.end.table(), schedule_progress(step, config))


def high_entropy_mask(entropies: np.ndarray, mask: np.ndarray, quantile: float) -> np.ndarray:
    """bool, same shape: model tokens strictly above the batch quantile of model entropies."""
    if not mask.any():
        return np.zeros_like(mask)
    threshold = np.quantile(entropies[mask], quantile)
    return mask & (entropies > threshold)


def normalize_mean_one(weights: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Rescale so the mean over `mask` is 1; 0 outside. All-zero weights stay 0 (no NaN)."""
    w = np.where(mask, weights, 0.0)
    total = w.sum()
    n = mask.sum()
    return (w * (n / total)).astype(np.float32) if total > 0 else w.astype(np.float32)


def rest_weights(roles: np.ndarray, entropies: np.ndarray, mask: np.ndarray, step: int,
                 config: RestConfig) -> np.ndarray:
    """float32 ResT weights, same shape as roles: mean 1 over `mask` (model tokens), 0 off it.
    `roles` is used for source=SPANS, `entropies` for source=ENTROPY."""
    mask = np.asarray(mask, dtype=bool)
    s = schedule_progress(step, config)
    if config.source is RoleSource.ENTROPY:
        table = _interpolate(config.entropy_start.table(), config.entropy_end.table(), s)
        is_high = high_entropy_mask(np.asarray(entropies), mask, config.entropy_quantile)
        raw = table[is_high.astype(np.int64)]
    else:
        raw = role_weight_table(step, config)[np.asarray(roles, dtype=np.int64)]
    return normalize_mean_one(raw, mask)


def rest_weights_for_trajectories(trajs: Sequence[Trajectory], step: int,
                                  config: RestConfig) -> list[np.ndarray]:
    """ResT weights per trajectory (float32[T_i]), normalised over the whole batch."""
    if not trajs:
        return []
    roles = np.concatenate([t.roles for t in trajs])
    entropies = np.concatenate([t.entropies for t in trajs])
    mask = np.concatenate([model_mask(t.kinds) for t in trajs])
    flat = rest_weights(roles, entropies, mask, step, config)
    return np.split(flat, np.cumsum([len(t) for t in trajs])[:-1])


def rest_metrics(trajs: Sequence[Trajectory], weights: Sequence[np.ndarray], step: int,
                 config: RestConfig) -> dict[str, float]:
    """rest/progress (schedule s at `step`) and rest/weight/<role>: the mean normalised weight
    of the batch's tokens of each role present, so a run shows structure losing weight."""
    roles = np.concatenate([t.roles for t in trajs]) if trajs else np.zeros(0, np.int8)
    flat = np.concatenate(weights) if trajs else np.zeros(0, np.float32)
    out = {"rest/progress": schedule_progress(step, config)}
    for role in TokenRole:
        on = roles == role
        if role is not TokenRole.NONE and on.any():
            out[f"rest/weight/{role.name.lower()}"] = float(flat[on].mean())
    return out
