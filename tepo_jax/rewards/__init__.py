"""Rewards: answer extraction, SQuAD F1/EM, math-verify equivalence, a task registry."""
from tepo_jax.rewards.extract import extract_answer, extract_answer_tag, extract_boxed
from tepo_jax.rewards.math_equiv import math_equivalent
from tepo_jax.rewards.qa import exact_match, normalize_answer, token_f1
from tepo_jax.rewards.registry import (REWARD_FNS, RewardResult, TaskRewards, attach_reward,
                                       compute_reward, get_reward_fn)

__all__ = ["extract_answer", "extract_answer_tag", "extract_boxed", "math_equivalent",
           "exact_match", "normalize_answer", "token_f1", "REWARD_FNS", "RewardResult",
           "TaskRewards", "attach_reward", "compute_reward", "get_reward_fn"]
from tepo_jax.rewards import function_calling as _function_calling  # noqa: E402,F401  registers 'function_calling'
