"""Per-token advantages for one GRPO group: grpo, tepo_sparse, tepo_dense (docs/design.md, TEPO).

Every function has the signature
    fn(group: Sequence[Trajectory], scores: Sequence[float], config) -> GroupAdvantages
where scores[i] is trajectory i's outcome score (F1 for QA, 1/0 correctness for math). The
result holds one float32[T_i] array per trajectory, aligned with its tokens, 0 on prompt and
tool-result tokens, plus per-trajectory info (m, n, I_k, ΔH_k, rewards) for metrics.
The function is chosen once from the config with get_advantage_fn(config.kind).
"""
from __future__ import annotations

import dataclasses
import enum
import math
from collections import defaultdict
from typing import Callable, Sequence

import numpy as np

from tepo_jax.config import ADVANTAGES
from tepo_jax.rollout.trajectory import (TokenKind, Trajectory, entropy_deltas,
                                         entropy_reducing, model_mask)


# The names are config.ADVANTAGES (the one list): AdvantageKind.GRPO.value == "grpo", etc.
AdvantageKind = enum.Enum("AdvantageKind", {name.upper(): name for name in ADVANTAGES})


class StdKind(enum.Enum):
    POPULATION = "population"   # ddof=0 (ours: defined for a group of one)
    SAMPLE = "sample"           # ddof=1, as tunix's algo_core and torch.std in TRL / verl


@dataclasses.dataclass(frozen=True)
class AdvantageConfig:
    """Advantage choices. Paper's (arXiv 2602.02050): the reward forms R_i = F1·m/n and
    R_{i,k} = F1·(1 + α·I_k), I_k = 1[ΔH_k < 0], and GRPO group normalisation.
    Ours (docs/design.md): I_k = 0 when a segment is empty; no_call_scale c = 1.0 for n = 0;
    dense tool-level advantages normalised over all calls of the group; the final segment gets
    the outcome advantage; a call the rollout did not run (UNRUN_CALL) is not in H(r_n) and
    gets the final segment's advantage. Also ours: alpha = 0.5 (the paper makes α a
    hyper-parameter; its value was not verified offline; config.algo.alpha has the same
    default), eps = 1e-6 and population std (ours; tunix and TRL use the sample std, ddof 1,
    available as StdKind.SAMPLE; population std is defined for a single-element group,
    sample std is not — with SAMPLE a group of one gets std 0). scale_by_std=False gives the
    mean-only baseline (Dr. GRPO style).
    """
    kind: AdvantageKind = AdvantageKind.GRPO
    alpha: float = 0.5
    no_call_scale: float = 1.0
    eps: float = 1e-6
    std_kind: StdKind = StdKind.POPULATION
    scale_by_std: bool = True

    def __post_init__(self):
        # Configs (ml_collections) carry strings; turn them into enums once, here.
        object.__setattr__(self, "kind", AdvantageKind(self.kind))
        object.__setattr__(self, "std_kind", StdKind(self.std_kind))
        if self.eps < 0:
            raise ValueError(f"eps must be >= 0, got {self.eps}")


@dataclasses.dataclass(frozen=True)
class TrajectoryAdvantageInfo:
    num_calls: int                      # n
    num_reducing: int                   # m = Σ_k I_k
    indicators: tuple[int, ...]         # I_1..I_n
    deltas: tuple[float, ...]           # ΔH_1..ΔH_n (NaN where a segment is empty)
    rewards: tuple[float, ...]          # (R_i,) for grpo/sparse; (R_i1..R_in) for dense
    outcome_advantage: float            # group-normalised outcome score


@dataclasses.dataclass(frozen=True)
class GroupAdvantages:
    advantages: list[np.ndarray]        # float32[T_i] per trajectory
    info: list[TrajectoryAdvantageInfo]


AdvantageFn = Callable[[Sequence[Trajectory], Sequence[float], AdvantageConfig],
                       GroupAdvantages]


def group_normalize(values: Sequence[float], config: AdvantageConfig) -> np.ndarray:
    """(v − mean) / (std + eps) in float64. Equal values give exactly 0 (never NaN); an empty
    input gives an empty array; SAMPLE std of a single value is taken as 0."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0 or np.all(v == v[0]):
        # Not v − mean: the float mean of equal values can be 1 ulp off, and dividing that
        # residue by an equally tiny std gives ±1 (NaN with eps 0), not 0.
        return np.zeros_like(v)
    centred = v - v.mean()
    if not config.scale_by_std:
        return centred
    ddof = 1 if (config.std_kind is StdKind.SAMPLE and v.size > 1) else 0
    return centred / (v.std(ddof=ddof) + config.eps)


def _check_group(group: Sequence[Trajectory], scores: Sequence[float]) -> None:
    if len(group) != len(scores):
        raise ValueError(f"{len(group)} trajectories but {len(scores)} scores")
    if not all(math.isfinite(s) for s in scores):
        raise ValueError(f"scores must be finite, got {list(scores)}")


def _tokenwise(traj: Trajectory, value: float) -> np.ndarray:
    return np.where(model_mask(traj.kinds), value, 0.0).astype(np.float32)


def _info(traj: Trajectory, rewards, outcome_adv: float) -> TrajectoryAdvantageInfo:
    indicators = tuple(entropy_reducing(traj))
    return TrajectoryAdvantageInfo(
        num_calls=traj.num_calls, num_reducing=sum(indicators), indicators=indicators,
        deltas=tuple(entropy_deltas(traj)), rewards=tuple(float(r) for r in rewards),
        outcome_advantage=float(outcome_adv))


def grpo_advantages(group, scores, config: AdvantageConfig) -> GroupAdvantages:
    """Outcome score group-normalised, the same on every model token."""
    _check_group(group, scores)
    adv = group_normalize(scores, config)
    return GroupAdvantages(
        advantages=[_tokenwise(t, a) for t, a in zip(group, adv)],
        info=[_info(t, [s], a) for t, s, a in zip(group, scores, adv)])


def sparse_reward(traj: Trajectory, score: float, no_call_scale: float) -> float:
    """R_i = F1_i · m_i / n_i; F1_i · c when the trajectory made no call."""
    n = traj.num_calls
    return score * no_call_scale if n == 0 else score * sum(entropy_reducing(traj)) / n


def tepo_sparse_advantages(group, scores, config: AdvantageConfig) -> GroupAdvantages:
    """Sparse TEPO: group-normalised R_i on every model token of trajectory i."""
    _check_group(group, scores)
    rewards = [sparse_reward(t, s, config.no_call_scale) for t, s in zip(group, scores)]
    adv = group_normalize(rewards, config)
    outcome = group_normalize(scores, config)
    return GroupAdvantages(
        advantages=[_tokenwise(t, a) for t, a in zip(group, adv)],
        info=[_info(t, [r], o) for t, r, o in zip(group, rewards, outcome)])


def dense_call_rewards(traj: Trajectory, score: float, alpha: float) -> list[float]:
    """[R_{i,1}, ..., R_{i,n}] with R_{i,k} = F1_i · (1 + α·I_{i,k})."""
    return [score * (1.0 + alpha * i_k) for i_k in entropy_reducing(traj)]


def _dense_tokens(traj: Trajectory, call_adv: np.ndarray, outcome_adv: float) -> np.ndarray:
    """Call k's advantage on its pre-segment (r_{k-1} and call_k); r_n gets the outcome, and so
    do the UNRUN_CALL tokens (turn n: they are in the final turn, only not in H(r_n))."""
    n = traj.num_calls
    # Advantage per turn for segment tokens: r_j (j < n) is the pre-segment of call j+1.
    seg_by_turn = np.append(call_adv, outcome_adv)              # index j -> r_j
    call_by_turn = np.append(0.0, call_adv)                     # index k -> call_k
    turns = traj.turns.astype(np.int64)
    out = np.zeros(len(traj), dtype=np.float64)
    call = traj.kinds == TokenKind.TOOL_CALL
    seg = model_mask(traj.kinds) & ~call                        # r_j tokens and unrun calls
    out[seg] = seg_by_turn[np.minimum(turns[seg], n)]
    out[call] = call_by_turn[turns[call]]
    return out.astype(np.float32)


def tepo_dense_advantages(group, scores, config: AdvantageConfig) -> GroupAdvantages:
    """Dense TEPO: per-call rewards normalised over all calls of the group, spread to the
    calls' pre-segments; the final segment gets the group-normalised outcome score."""
    _check_group(group, scores)
    per_traj = [dense_call_rewards(t, s, config.alpha) for t, s in zip(group, scores)]
    flat = group_normalize([r for rs in per_traj for r in rs], config)
    splits = np.cumsum([len(rs) for rs in per_traj])[:-1]
    call_adv = np.split(flat, splits) if len(group) else []
    outcome = group_normalize(scores, config)
    return GroupAdvantages(
        advantages=[_dense_tokens(t, c, o) for t, c, o in zip(group, call_adv, outcome)],
        info=[_info(t, rs, o) for t, rs, o in zip(group, per_traj, outcome)])


ADVANTAGE_FNS: dict[AdvantageKind, AdvantageFn] = {
    AdvantageKind.GRPO: grpo_advantages,
    AdvantageKind.TEPO_SPARSE: tepo_sparse_advantages,
    AdvantageKind.TEPO_DENSE: tepo_dense_advantages,
}


def get_advantage_fn(kind: AdvantageKind | str) -> AdvantageFn:
    """The advantage function for `kind` (an AdvantageKind or its config string value)."""
    return ADVANTAGE_FNS[AdvantageKind(kind)]


def batch_advantages(trajs: Sequence[Trajectory], scores: Sequence[float],
                     config: AdvantageConfig) -> GroupAdvantages:
    """Advantages for a batch holding several groups: groups by `group_id`, applies the
    configured function per group, and returns results in the batch's order."""
    _check_group(trajs, scores)
    fn = get_advantage_fn(config.kind)
    members: dict[int, list[int]] = defaultdict(list)
    for idx, traj in enumerate(trajs):
        members[traj.group_id].append(idx)
    advantages: list = [None] * len(trajs)
    info: list = [None] * len(trajs)
    for idxs in members.values():
        result = fn([trajs[i] for i in idxs], [scores[i] for i in idxs], config)
        for j, i in enumerate(idxs):
            advantages[i], info[i] = result.advantages[j], result.info[j]
    return GroupAdvantages(advantages=advantages, info=info)
