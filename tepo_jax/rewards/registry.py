"""Outcome rewards per task, chosen once through a registry (never by string tests later).

A reward function maps (model text, gold) -> RewardResult. `score` is the outcome signal the
advantages use: token F1 for QA (TEPO's F1_i), 1/0 correctness for math. A malformed answer
(no closed <answer> tag, or an empty one) scores 0 with malformed=True so it can be counted.

Rewards that move with the RL step (ResT's function-calling ranges) are held by a
`TaskRewards`, built once from the config (`TaskRewards.from_config`); the rollout scores every
trajectory through it with the step, and `rollout.trajectory.attach_reward` keeps the reward's
parts on the trajectory for the metrics.

REWARD_FNS is written out in one place, here: a new task's reward is one more entry.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Mapping, Optional

from tepo_jax.rewards.base import MALFORMED, Gold, RewardFn, RewardResult, StepRewardFn
from tepo_jax.rewards.extract import extract_answer
from tepo_jax.rewards.function_calling import (FunctionCallReward, function_calling_reward,
                                               reward_config)
from tepo_jax.rewards.math_equiv import math_equivalent
from tepo_jax.rewards.qa import exact_match, token_f1
from tepo_jax.tools.json_format import JsonCallFormat


def qa_f1_reward(text: str, gold: Gold) -> RewardResult:
    answer = extract_answer(text)
    if answer is None:
        return MALFORMED
    f1 = token_f1(answer, gold)
    return RewardResult(score=f1, f1=f1, em=exact_match(answer, gold), malformed=False,
                        extracted=answer)


def qa_em_reward(text: str, gold: Gold) -> RewardResult:
    result = qa_f1_reward(text, gold)
    return dataclasses.replace(result, score=result.em)


def math_reward(text: str, gold: Gold) -> RewardResult:
    answer = extract_answer(text)
    if answer is None:
        return MALFORMED
    correct = float(math_equivalent(answer, gold))
    return RewardResult(score=correct, f1=correct, em=correct, malformed=False, extracted=answer)


REWARD_FNS: dict[str, RewardFn] = {
    "qa": qa_f1_reward,
    "qa_em": qa_em_reward,
    "math": math_reward,
    "function_calling": function_calling_reward,
}


def get_reward_fn(task: str) -> RewardFn:
    try:
        return REWARD_FNS[task]
    except KeyError:
        raise ValueError(f"unknown reward task {task!r}; known: {sorted(REWARD_FNS)}") from None


def compute_reward(text_or_traj, gold: Gold | None = None,
                   task: str | None = None) -> RewardResult:
    """Score a model text (or a Trajectory's final_text, gold and task) for `task`."""
    if not isinstance(text_or_traj, str):  # a Trajectory
        traj = text_or_traj
        return get_reward_fn(task or traj.task)(traj.final_text,
                                                traj.gold if gold is None else gold)
    if gold is None or task is None:
        raise ValueError("compute_reward(text, gold, task): gold and task are required for text")
    return get_reward_fn(task)(text_or_traj, gold)


@dataclasses.dataclass(frozen=True)
class TaskRewards:
    """The reward of each task at an RL step. `scheduled` maps the tasks whose reward moves
    with the step (function calling under ResT's schedule) to a (text, gold, step) function;
    every other task uses its REWARD_FNS entry, which has no step."""

    scheduled: Mapping[str, StepRewardFn] = dataclasses.field(default_factory=dict)
    # A user reward (tepo_jax/plugins.py): fn(text, gold, trajectory), for every task.
    custom: Optional[Callable] = None

    @classmethod
    def from_config(cls, config, fmt=None, custom: Optional[Callable] = None) -> "TaskRewards":
        """The rollout's rewards for an experiment config: function calling scored at the RL
        step with `reward_config` (`config.reward`), in the dialect of `fmt` when it is a
        JsonCallFormat."""
        dialect = fmt.dialect.name if isinstance(fmt, JsonCallFormat) else "qwen2.5"
        return cls(scheduled={"function_calling": FunctionCallReward(reward_config(config, dialect))},
                   custom=custom)

    def __call__(self, text: str, gold: Gold, task: str, step: int = 0, trajectory=None) -> RewardResult:
        if self.custom is not None:
            return self.custom(text, gold, trajectory)
        fn = self.scheduled.get(task)
        return fn(text, gold, step) if fn is not None else get_reward_fn(task)(text, gold)
