"""Rewards: answer extraction, SQuAD F1/EM, math-verify equivalence, function-call scores, and
the task registry (`REWARD_FNS`, written out in registry.py)."""
from tepo_jax.rewards.base import RewardResult
from tepo_jax.rewards.extract import extract_answer, extract_answer_tag, extract_boxed
from tepo_jax.rewards.math_equiv import math_equivalent
from tepo_jax.rewards.qa import exact_match, normalize_answer, token_f1
from tepo_jax.rewards.registry import REWARD_FNS, TaskRewards, compute_reward, get_reward_fn

__all__ = ["extract_answer", "extract_answer_tag", "extract_boxed", "math_equivalent",
           "exact_match", "normalize_answer", "token_f1", "REWARD_FNS", "RewardResult",
           "TaskRewards", "compute_reward", "get_reward_fn"]
