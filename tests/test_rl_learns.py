"""RL learns: the real rollout + `rl_step` (GRPO and TEPO-dense) raises a tiny random policy's
reward on a verifiable one-token task within a few steps, and the same run with the advantage
sign flipped, or with the loss mask shifted by one token either way, does not.

The task: the answer is one token, rewarded 1 when it is a digit (10 of the tiny
vocabulary's ~400 tokens, so a random policy scores ~0.03 and some groups have a success).
A one-token answer makes the test sensitive to the loss mask: shifted by one, the loss lands
on the prompt's last token (or past the answer), and nothing moves the answer's distribution.
The task has no tool calls, so TEPO-dense runs its no-call path (the outcome advantage on every
model token, as GRPO); its per-call path is checked against numpy in test_advantages.py and
learns in the demo (docs/demo.md).
"""
import dataclasses

import jax
import numpy as np
import pytest

from tepo_jax.data.prompts import system_prompt, user_prompt
from tepo_jax.data.records import MathExample
from tepo_jax.models.config import ModelConfig
from tepo_jax.rewards import RewardResult, TaskRewards
from tepo_jax.rl import loop as rl_loop
from tepo_jax.rl.advantages import AdvantageConfig
from tepo_jax.rl.batch import power_of_two_buckets
from tepo_jax.rl.loss import LossConfig
from tepo_jax.rl.optim import OptimConfig, build_optimizer
from tepo_jax.rl.train_step import create_train_state, make_train_step
from tepo_jax.rollout.agent import AgentLoop, RolloutConfig
from tepo_jax.sampling.config import SamplerConfig
from tepo_jax.sampling.sampler import Sampler
from tepo_jax.sharding import MeshConfig, batch_sharding, create_sharded_model, make_mesh
from tepo_jax.tiny_tokenizer import build_tiny_tokenizer
from tepo_jax.tokenizer import load_tokenizer, stop_token_ids
from tepo_jax.tools import ToolBridge, ToolFormat

STEPS, PROMPTS, GROUP = 14, 8, 8
DIGITS = set("0123456789")


def digit_reward(text: str, gold, step: int) -> RewardResult:
    hit = float(text.strip() in DIGITS)
    return RewardResult(score=hit, f1=hit, em=hit, malformed=False, extracted=text)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    prompts = [system_prompt((), "short"), user_prompt(MathExample("q", "Write a number.", "1"))]
    words = ["the answer is a number", "numbers and words", "tool calls and results"]
    path = build_tiny_tokenizer((prompts + words) * 20, tmp_path_factory.mktemp("tok"), vocab_size=400,
                                word_split=False)
    return load_tokenizer(path)


def mutate(kind: str):
    """A `sequence_from_trajectory` with one bug planted (or none)."""
    real = rl_loop.sequence_from_trajectory

    def wrapped(traj, advantages, **kw):
        seq = real(traj, advantages, **kw)
        if kind == "flip_sign":
            return dataclasses.replace(seq, advantages=-seq.advantages)
        if kind in ("mask_left", "mask_right"):  # an off-by-one: the per-token fields move, the tokens do not
            shift = -1 if kind == "mask_left" else 1
            moved = {f: np.roll(getattr(seq, f), shift) for f in ("loss_mask", "advantages", "old_logprobs")}
            moved["loss_mask"][0] = 0.0          # the first token never has a prediction
            return dataclasses.replace(seq, **moved)
        return seq
    return wrapped


@pytest.fixture(scope="module")
def parts(tokenizer):
    """Model, rollout loop and compiled steps, built once: every test trains a fresh state."""
    mesh = make_mesh(MeshConfig(1, 1, 1), devices=jax.devices()[:1])
    cfg = ModelConfig(family="qwen2", vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                      num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16, qkv_bias=True,
                      tie_word_embeddings=True)
    model = create_sharded_model(cfg, mesh, seed=0)
    optimizer = build_optimizer(OptimConfig(learning_rate=3e-2))
    loss_cfg = LossConfig()
    model_def, _, shardings = create_train_state(model, optimizer, mesh)
    sampler = Sampler(model, SamplerConfig(max_slots=PROMPTS * GROUP, cache_buckets=(128,), steps_per_call=4,
                                           eos_ids=tuple(stop_token_ids(tokenizer)), seed=0), tokenizer=tokenizer)
    with ToolBridge({}) as bridge:
        agent = AgentLoop(sampler, bridge, tokenizer, ToolFormat(tools=()),
                          RolloutConfig(group_size=GROUP, max_calls=0, max_tokens=1, max_turn_tokens=1),
                          tools=(), rewards=TaskRewards(scheduled={"math": digit_reward}), prompt_style="short")
        yield dict(mesh=mesh, cfg=cfg, optimizer=optimizer, model_def=model_def, agent=agent,
                   step_fn=make_train_step(model_def, optimizer, loss_cfg, mesh, shardings, batch_sharding(mesh)))


def train_rewards(parts, advantage: str, mutation: str, monkeypatch) -> list[float]:
    """Mean reward of each of STEPS real RL steps from the same initial policy and seed."""
    monkeypatch.setattr(rl_loop, "sequence_from_trajectory", mutate(mutation))
    mesh = parts["mesh"]
    # A fresh model each time: the train step donates the state's arrays.
    _, state, _ = create_train_state(create_sharded_model(parts["cfg"], mesh, seed=0), parts["optimizer"], mesh)
    step_cfg = rl_loop.RLStepConfig(advantage=AdvantageConfig(kind=advantage), rest=None, kl_coef=0.0,
                                    row_multiple=1, seq_buckets=power_of_two_buckets(128, 128))
    examples = [MathExample(f"q{i}", "Write a number.", str(i)) for i in range(PROMPTS)]
    rewards = []
    for step in range(STEPS):
        state, metrics, _ = rl_loop.rl_step(
            state, examples, step, agent=parts["agent"], model_def=parts["model_def"], train_step=parts["step_fn"],
            put_batch=lambda b: jax.device_put(b, batch_sharding(mesh)),
            cfg=step_cfg, seed=0)
        rewards.append(metrics["reward/score"])
    print(f"{advantage}, bug {mutation}: mean reward per step {np.round(rewards, 3).tolist()}")  # pytest -rP shows it
    return rewards


def gain(rewards: list[float]) -> float:
    """Mean reward of the last 3 steps minus that of the first 3."""
    return float(np.mean(rewards[-3:]) - np.mean(rewards[:3]))


@pytest.mark.parametrize("advantage", ["grpo", "tepo_dense"])
def test_rl_raises_the_reward(parts, advantage, monkeypatch):
    rewards = train_rewards(parts, advantage, "none", monkeypatch)
    assert np.mean(rewards[:3]) < 0.2, rewards            # the task is not solved at the start
    assert gain(rewards) > 0.4, rewards


@pytest.mark.parametrize("mutation", ["flip_sign", "mask_left", "mask_right"])
def test_a_planted_bug_stops_the_learning(parts, mutation, monkeypatch):
    """The test above can fail: the same GRPO run with one bug planted gains nothing."""
    rewards = train_rewards(parts, "grpo", mutation, monkeypatch)
    assert gain(rewards) < 0.1, rewards
