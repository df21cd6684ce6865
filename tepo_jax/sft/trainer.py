"""Supervised warm start on tool-use trajectories: cross-entropy on model tokens only.

Prompt and tool-result tokens are context, never targets (the same loss mask RL uses). The
step shares the RL step's state, optimizer, chunked logprob and shardings; only the loss
differs: −Σ mask·log p / Σ mask, the token mean over the batch's model tokens.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from tepo_jax.errors import ConfigError
from tepo_jax.rl.batch import SequenceData, TrainBatch, pack_sequences
from tepo_jax.rl.loss import LossConfig, loss_token_mask
from tepo_jax.rl.train_step import ModelDef, TrainState, apply_update_if_finite, forward_loss
from tepo_jax.sharding import replicated
from tepo_jax.xla_options import program_options


def sft_sequence(traj) -> SequenceData:
    n = len(traj)
    return SequenceData(tokens=np.asarray(traj.token_ids), loss_mask=traj.model_mask().astype(np.float32),
                        advantages=np.zeros(n, np.float32), old_logprobs=np.zeros(n, np.float32))


# Row counts an SFT batch is rounded up to: even numbers, not powers of two. 5 rows of packed
# trajectories padded to 8 would be 60% more work per step; to 6, 20% (and a handful of
# compiled shapes over a run instead of two or three).
SFT_ROW_BUCKETS = tuple(range(2, 4097, 2))


def check_seq_len(trajs: Sequence, seq_len: int) -> None:
    """ConfigError unless every trajectory fits a row of `seq_len` tokens."""
    longest = max(len(t) for t in trajs)
    if longest > seq_len:
        raise ConfigError(f"config.sft.seq_len={seq_len} is shorter than an SFT trajectory "
                          f"({longest} tokens); raise it")


def sft_batch(trajs: Sequence, seq_len: int, row_multiple: int) -> TrainBatch:
    """Pack trajectories into rows of `seq_len` tokens (several per row when they fit)."""
    check_seq_len(trajs, seq_len)
    return pack_sequences([sft_sequence(t) for t in trajs], seq_len=seq_len, row_multiple=row_multiple,
                          row_buckets=SFT_ROW_BUCKETS).batch


def _token_nll(logp, inputs):
    """−mask · log p / N per token (N: the batch's model tokens, at every token)."""
    mask, num_tokens = inputs
    return -(mask * logp) / num_tokens


def sft_loss(model_def: ModelDef, params, batch: TrainBatch, loss_cfg: LossConfig):
    # Demonstrations fit the model's own distribution, whatever temperature RL trains at.
    loss_cfg = dataclasses.replace(loss_cfg, policy_temperature=1.0)
    mask = loss_token_mask(batch)
    n = jnp.maximum(jnp.sum(mask), 1.0)
    loss, logp, entropy = forward_loss(model_def, params, batch, loss_cfg, _token_nll,
                                       (mask, jnp.broadcast_to(n, mask.shape)))
    nll = -jnp.sum(mask * logp) / n   # the loss's value, summed as before (logp is a metric here)
    return loss, {"sft/nll": nll, "sft/entropy": jnp.sum(mask * entropy) / n, "sft/tokens": n}


def make_sft_step(model_def: ModelDef, optimizer: optax.GradientTransformation, loss_cfg: LossConfig,
                  mesh, state_shardings: TrainState, batch_sharding):
    """Jitted `sft_step(state, batch) -> (state, metrics)` with the state donated."""

    def step(state: TrainState, batch: TrainBatch):
        grad_fn = jax.value_and_grad(lambda p: sft_loss(model_def, p, batch, loss_cfg), has_aux=True)
        (loss, metrics), grads = grad_fn(state.params)
        new, update_metrics = apply_update_if_finite(optimizer, state, grads, loss)
        metrics.update({f"sft/{k}": v for k, v in update_metrics.items()})
        return new, metrics

    batch_shardings = TrainBatch(*([batch_sharding] * len(TrainBatch._fields)))
    return jax.jit(step, in_shardings=(state_shardings, batch_shardings),
                   out_shardings=(state_shardings, replicated(mesh)), donate_argnums=(0,),
                   compiler_options=program_options(mesh.devices.flat[0].platform))
