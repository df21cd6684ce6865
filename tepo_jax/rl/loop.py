"""One RL step: rollout → rewards → advantages (+ ResT) → TrainBatch → train_step.

Host work (trajectories, advantages) is numpy; the policy's params never leave the device:
the sampler decodes with the train state's current arrays (`sampler_state`), the same arrays
the next train step donates.

Multi-process (`tepo_jax.multihost`): each process rolls out its `positions` of the step's
global batch on its own sampler (`localize` brings the params to its local mesh), the
trajectories are gathered to every process in global order, and from there the step is the
single-process one: the same advantages, the same packed batch (`put_batch` builds the global
arrays from it), the same metrics.
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable, Optional, Sequence

import jax
import numpy as np
from flax import nnx

from tepo_jax import multihost
from tepo_jax.rl.advantages import (AdvantageConfig, AdvantageKind, GroupAdvantages,
                                    batch_advantages)
from tepo_jax.rl.batch import PackedBatch, pack_sequences, sequence_from_trajectory
from tepo_jax.rl.rest import (EntropyWeights, RestConfig, RoleSource, RoleWeights, rest_metrics,
                              rest_weights_for_trajectories)
from tepo_jax.rl.tepo_metrics import advantage_metrics, tepo_step_metrics
from tepo_jax.rl.train_step import ModelDef, TrainState
from tepo_jax.rollout.agent import AgentLoop
from tepo_jax.rollout.trajectory import Trajectory


@dataclasses.dataclass(frozen=True)
class RLStepConfig:
    advantage: AdvantageConfig
    rest: Optional[RestConfig]          # None: no ResT re-weighting
    kl_coef: float
    row_multiple: int                   # batch shards × micro-batches
    seq_buckets: tuple[int, ...]
    # The sampler-vs-trainer logprob difference (read off the update's own forward: no extra
    # pass) is logged on the RL steps divisible by this (steps counted from 1); 0 never.
    logprob_check_every: int = 1


def sampler_state(model_def: ModelDef, params) -> nnx.State:
    """The NNX state the sampler decodes with, built around the train state's own arrays."""
    return nnx.state(model_def.merge(params))


def outcome_score(traj: Trajectory, kind: AdvantageKind) -> float:
    """GRPO's outcome is the task reward; TEPO's formulas are written on F1 in [0, 1]
    (R = F1·m/n, F1·(1 + α·I_k)). They coincide for QA (score = F1) and math (1/0); for
    function calling the reward is format + correctness in [-3, 4], and a negative score
    times m/n would punish the entropy-reducing calls of a bad trajectory."""
    return float(traj.reward if kind is AdvantageKind.GRPO else traj.f1)


def build_batch(trajs: Sequence[Trajectory], cfg: RLStepConfig,
                step: int) -> tuple[PackedBatch, GroupAdvantages, dict]:
    """(packed batch, the advantages and their info, ResT metrics) for scored trajectories."""
    scores = [outcome_score(t, cfg.advantage.kind) for t in trajs]
    adv = batch_advantages(trajs, scores, cfg.advantage)
    weights = rest_weights_for_trajectories(trajs, step, cfg.rest) if cfg.rest else [None] * len(trajs)
    seqs = [sequence_from_trajectory(t, a, token_weights=w) for t, a, w in zip(trajs, adv.advantages, weights)]
    packed = pack_sequences(seqs, row_multiple=cfg.row_multiple, length_buckets=cfg.seq_buckets)
    return packed, adv, rest_metrics(trajs, weights, step, cfg.rest) if cfg.rest else {}


def step_advantage_metrics(trajs: Sequence[Trajectory], adv: GroupAdvantages, cfg: RLStepConfig) -> dict:
    """adv/* metrics of the step (tepo_metrics.advantage_metrics); the α·I bonus for dense."""
    dense = cfg.advantage.kind is AdvantageKind.TEPO_DENSE
    return advantage_metrics(adv.info, adv.advantages, trajs, cfg.advantage.alpha if dense else None)


def rl_step(state: TrainState, examples: Sequence, step: int, *, agent: AgentLoop, model_def: ModelDef,
            train_step: Callable, put_batch: Callable, cfg: RLStepConfig, seed: int, ref_params=None,
            batch_slots: Optional[Sequence[int]] = None,
            localize: Optional[Callable] = None) -> tuple[TrainState, dict, list[Trajectory]]:
    """Run one RL step; returns (new state, metrics, the step's trajectories).

    `examples` are this process's prompts, at `batch_slots` of the global batch (default: all
    of it, slots 0, 1, …); `localize` maps the sampler state to the local sampler's
    devices (multi-process). The returned trajectories are the whole global batch's.
    `train_step` is `make_train_step(...)`, built with `reference=True` when cfg.kl_coef > 0
    (it then takes `ref_params` and computes the reference logprobs in the update's program).

    No pass is run twice: the update's own forward is the sampler-vs-trainer check. Its
    params are the ones the sampler decoded with (one update per batch), so its
    `logprob_diff_mean_abs` is the mean |sampler − trainer| logprob over the model tokens.
    """
    t0 = time.perf_counter()
    params = sampler_state(model_def, state.params)
    agent.sampler.update_params(localize(params) if localize else params)
    trajs = agent.run(examples, seed=seed * 1_000_003 + step, batch_slots=batch_slots, step=step)
    t_rollout = time.perf_counter() - t0
    if batch_slots is not None:
        trajs = multihost.gather_groups(trajs, batch_slots)
    packed, adv, rest = build_batch(trajs, cfg, step)
    batch = put_batch(packed.batch)
    t_update = time.perf_counter()
    state, train_metrics = (train_step(state, batch, ref_params) if cfg.kl_coef > 0 else train_step(state, batch))
    train_metrics = jax.device_get(train_metrics)
    metrics = {f"train/{k}": float(v) for k, v in train_metrics.items()}
    # `step` counts from 0; the RL steps (metric rows) count from 1, as eval_every's do.
    if cfg.logprob_check_every and (step + 1) % cfg.logprob_check_every == 0:
        metrics["rl/sampler_trainer_logprob_diff"] = metrics["train/logprob_diff_mean_abs"]
    metrics.update(tepo_step_metrics(trajs))
    metrics.update(step_advantage_metrics(trajs, adv, cfg))
    metrics.update(rest)
    t_end = time.perf_counter()
    metrics.update({"time/rollout_s": t_rollout, "time/update_s": t_end - t_update, "time/step_s": t_end - t0,
                    "rl/batch_tokens": float(packed.batch.tokens.size)})
    return state, metrics, trajs


def eval_metrics(trajs: Sequence[Trajectory]) -> dict:
    """Held-out metrics of greedy rollouts: accuracy, F1, tool use, ΔH, tool failures."""
    calls = [c for t in trajs for c in t.tool_calls]
    out = {"eval/accuracy": float(np.mean([t.em for t in trajs])),
           "eval/f1": float(np.mean([t.f1 for t in trajs])),
           "eval/calls_per_question": float(np.mean([t.num_calls for t in trajs])),
           # a rate over no calls is undefined (NaN, null in metrics.jsonl), as tepo_metrics' are
           "eval/tool_failure_rate": float(np.mean([c.status != "ok" for c in calls])) if calls else math.nan,
           "eval/malformed_rate": float(np.mean([bool(t.malformed) for t in trajs]))}
    tepo = tepo_step_metrics(trajs)
    out.update({f"eval/{k}": v for k, v in tepo.items() if k.startswith("tepo/")})
    return out


def advantage_config(config) -> AdvantageConfig:
    """The advantage settings of an experiment config (`config.algo`)."""
    a = config.algo
    return AdvantageConfig(kind=a.advantage, alpha=a.alpha, no_call_scale=a.no_call_scale, eps=a.adv_eps,
                           std_kind=a.adv_std, scale_by_std=a.adv_scale_by_std)


def rest_config(config, total_steps: int) -> Optional[RestConfig]:
    """ResT settings of `config.algo` (None when algo.rest is off); the schedule runs over
    algo.rest_total_steps, or over `total_steps` (the RL phase's steps) when that is 0."""
    a = config.algo
    if not a.rest:
        return None
    return RestConfig(source=RoleSource.ENTROPY if a.rest_entropy_roles else RoleSource.SPANS,
                      schedule=a.rest_schedule, total_steps=a.rest_total_steps or max(total_steps, 1),
                      start=RoleWeights(**a.rest_start.to_dict()), end=RoleWeights(**a.rest_end.to_dict()),
                      entropy_quantile=a.rest_entropy_quantile,
                      entropy_start=EntropyWeights(**a.rest_entropy_start.to_dict()),
                      entropy_end=EntropyWeights(**a.rest_entropy_end.to_dict()))
