"""Per-step TEPO metrics from a batch of trajectories, as a flat dict[str, float].

Names are stable (dashboards and notebooks key on them). A mean over nothing (e.g. ΔH in a
batch without calls) is NaN rather than 0, so "undefined" is never read as a value; the
always-present keys are listed in STABLE_KEYS. Per-tool keys (`tepo/dh/<tool>`,
`tepo/dh_std/<tool>`, `tepo/frac_reducing/<tool>`, `tepo/calls/<tool>`) appear for the tools
seen in the batch. A multi-call turn (function calling: one ToolCallRecord, names joined by
",") has one ΔH; it counts once under each distinct tool it called (`call_tools`), so the
per-tool call counts may sum to more than `tepo/num_calls`.
"""
from __future__ import annotations

import math
from collections import defaultdict
from typing import Sequence

import numpy as np

from tepo_jax.rollout.trajectory import (FINISH_REASONS, ToolCallRecord, Trajectory,
                                         entropy_deltas, entropy_reducing, model_mask,
                                         segment_entropies)

STABLE_KEYS = (
    "tepo/h_r0", "tepo/h_later", "tepo/dh_mean", "tepo/dh_std", "tepo/frac_reducing",
    "tepo/calls_per_traj", "tepo/no_call_rate", "tepo/num_calls",
    "reward/score", "reward/f1", "reward/em", "reward/malformed_rate",
    "traj/len_mean", "traj/model_tokens_mean",
) + tuple(f"finish/{r}" for r in FINISH_REASONS)


def _mean(values) -> float:
    values = [v for v in values if not math.isnan(v)]
    return float(np.mean(values)) if values else math.nan


def _std(values) -> float:
    values = [v for v in values if not math.isnan(v)]
    return float(np.std(values)) if values else math.nan


def _ratio(num: float, den: float) -> float:
    return num / den if den else math.nan


def entropy_metrics(trajs: Sequence[Trajectory]) -> dict[str, float]:
    """Segment entropies, ΔH per call, fraction of entropy-reducing calls, call counts."""
    h_r0, h_later, deltas = [], [], []
    m_total = n_total = 0
    for t in trajs:
        h = segment_entropies(t)
        h_r0.append(h[0])
        h_later.extend(h[1:])
        deltas.extend(entropy_deltas(t))
        m_total += sum(entropy_reducing(t))
        n_total += t.num_calls
    no_call = sum(t.num_calls == 0 for t in trajs)
    return {
        "tepo/h_r0": _mean(h_r0),
        "tepo/h_later": _mean(h_later),          # mean over all non-empty r_k, k >= 1
        "tepo/dh_mean": _mean(deltas),           # over calls with both segments non-empty
        "tepo/dh_std": _std(deltas),
        "tepo/frac_reducing": _ratio(m_total, n_total),   # Σm / Σn
        "tepo/calls_per_traj": _ratio(n_total, len(trajs)),
        "tepo/no_call_rate": _ratio(no_call, len(trajs)),
        "tepo/num_calls": float(n_total),
    }


def call_tools(call: ToolCallRecord) -> tuple[str, ...]:
    """The distinct tool names of a call record, in order: one for a single call, several
    for a multi-call turn ("get_weather,convert" -> ("get_weather", "convert"))."""
    return tuple(dict.fromkeys(n for n in call.name.split(",") if n)) or (call.name,)


def per_tool_metrics(trajs: Sequence[Trajectory]) -> dict[str, float]:
    """ΔH mean and std, reducing fraction and call count per tool name."""
    deltas, reducing = defaultdict(list), defaultdict(list)
    for t in trajs:
        for call, dh, i_k in zip(t.tool_calls, entropy_deltas(t), entropy_reducing(t)):
            for name in call_tools(call):
                deltas[name].append(dh)
                reducing[name].append(i_k)
    out = {}
    for name in sorted(deltas):
        out[f"tepo/dh/{name}"] = _mean(deltas[name])
        out[f"tepo/dh_std/{name}"] = _std(deltas[name])
        out[f"tepo/frac_reducing/{name}"] = float(np.mean(reducing[name]))
        out[f"tepo/calls/{name}"] = float(len(reducing[name]))
    return out


def reward_metrics(trajs: Sequence[Trajectory]) -> dict[str, float]:
    """Means of the reward fields over the trajectories that have been scored."""
    scored = [t for t in trajs if t.reward is not None]
    return {
        "reward/score": _mean([t.reward for t in scored]),
        "reward/f1": _mean([t.f1 for t in scored if t.f1 is not None]),
        "reward/em": _mean([t.em for t in scored if t.em is not None]),
        "reward/malformed_rate": _mean([float(bool(t.malformed)) for t in scored]),
    }


# Short metric prefix of a task's reward parts: `reward/fc/format`, `reward/fc/correctness`, ...
_PART_PREFIX = {"function_calling": "fc"}


def reward_part_metrics(trajs: Sequence[Trajectory]) -> dict[str, float]:
    """Mean of each reward part (`Trajectory.reward_parts`) over the trajectories that have
    it, as `reward/<task prefix>/<part>`; nothing for tasks whose reward has no parts."""
    parts = defaultdict(list)
    for t in trajs:
        for name, value in (t.reward_parts or {}).items():
            parts[f"reward/{_PART_PREFIX.get(t.task, t.task)}/{name}"].append(float(value))
    return {key: float(np.mean(values)) for key, values in sorted(parts.items())}


def advantage_metrics(info: Sequence, advantages: Sequence[np.ndarray], trajs: Sequence[Trajectory],
                      bonus_alpha: float | None = None) -> dict[str, float]:
    """What the advantage function saw and gave (`rl.advantages` GroupAdvantages):
    adv/reward_mean  mean of the rewards it normalised: R_i (grpo: the outcome score;
                     tepo_sparse: F1·m/n) or, for tepo_dense, R_{i,k} over all calls;
    adv/bonus_mean   tepo_dense only (`bonus_alpha` = α): mean α·I_{i,k} over all calls;
    adv/mean, adv/std  of the per-token advantages over all model tokens of the batch;
    adv/zero_groups  the share of groups (prompts) whose every model token has advantage 0:
                     groups that teach nothing (all rewards equal, e.g. all wrong)."""
    rewards = [r for i in info for r in i.rewards]
    per_traj = [a[model_mask(t.kinds)] for a, t in zip(advantages, trajs)]
    tokens = np.concatenate(per_traj) if trajs else np.zeros(0)
    signal: dict[int, bool] = defaultdict(bool)
    for a, t in zip(per_traj, trajs):
        signal[t.group_id] |= bool(np.any(a != 0))
    out = {"adv/reward_mean": _mean(rewards),
           "adv/mean": float(tokens.mean()) if tokens.size else math.nan,
           "adv/std": float(tokens.std()) if tokens.size else math.nan,
           "adv/zero_groups": _ratio(sum(not s for s in signal.values()), len(signal))}
    if bonus_alpha is not None:
        out["adv/bonus_mean"] = _mean([bonus_alpha * i_k for i in info for i_k in i.indicators])
    return out


def finish_metrics(trajs: Sequence[Trajectory]) -> dict[str, float]:
    return {f"finish/{r}": _ratio(sum(t.finish_reason == r for t in trajs), len(trajs))
            for r in FINISH_REASONS}


def length_metrics(trajs: Sequence[Trajectory]) -> dict[str, float]:
    return {
        "traj/len_mean": _mean([float(len(t)) for t in trajs]),
        "traj/model_tokens_mean": _mean([float(model_mask(t.kinds).sum()) for t in trajs]),
    }


def tepo_step_metrics(trajs: Sequence[Trajectory]) -> dict[str, float]:
    """All per-step metrics of a batch, flat, with the STABLE_KEYS always present."""
    out: dict[str, float] = {}
    for part in (entropy_metrics, per_tool_metrics, reward_metrics, reward_part_metrics,
                 finish_metrics, length_metrics):
        out.update(part(trajs))
    return out
