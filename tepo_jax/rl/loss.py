"""The policy loss: token-level clipped policy gradient, token mean over all model tokens of the
batch, optional ResT token weights, optional k3 KL to a frozen reference (docs/design.md, "Loss").

Per model token t (m_t = 1), with logp the current policy's logprob, A the advantage and
w the ResT weight:

    ρ_t   = exp(logp_t − old_logp_t)
    pg_t  = −min(ρ_t · A_t, clip(ρ_t, 1 − ε_low, 1 + ε_high) · A_t)
    kl_t  = exp(ref_t − logp_t) − (ref_t − logp_t) − 1                    (k3, ≥ 0)
    loss  = Σ_t m_t · w_t · pg_t / N  +  β · Σ_t m_t · kl_t / N,   N = Σ_t m_t over the batch

ResT weights re-weight the policy-gradient term only (they are defined as weights of the policy
gradient); the KL regulariser is a plain token mean. Prompt, tool-result and padding tokens
(m_t = 0) carry no loss: their per-token terms are computed from sanitised inputs and then
selected away, so their gradient is exactly zero even if their inputs are garbage.

N is passed in explicitly, so that a micro-batch's loss uses the token count of the whole batch
and summed micro-batch gradients equal the full-batch gradient (see `train_step.py`).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

from tepo_jax.rl.batch import TrainBatch
from tepo_jax.seqlogprob import prediction_mask


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Loss hyper-parameters. Aggregation is fixed: token mean over all model tokens (docs/design.md).

    eps_low / eps_high: the ratio clip range [1 − eps_low, 1 + eps_high]. Default 0.2 / 0.2
      (PPO's symmetric clip). DAPO's clip-higher, eps_high=0.28, is the config default
      (tepo_jax/config.py, docs/design.md).
    kl_coef: β of the k3 KL to the reference model; 0 disables it (ref_logprobs are then not
      read and the `kl` metric is 0).
    seq_chunk: sequence positions per chunk of the logprob computation (memory B·seq_chunk·V);
      None computes all logits at once.
    vocab_chunk: optional vocabulary chunk inside `logprob_and_entropy`.
    """

    eps_low: float = 0.2
    eps_high: float = 0.2
    kl_coef: float = 0.0
    seq_chunk: Optional[int] = 256
    vocab_chunk: Optional[int] = None

    def __post_init__(self):
        if not (0.0 <= self.eps_low < 1.0) or self.eps_high < 0.0:
            raise ValueError(f"need 0 <= eps_low < 1 and eps_high >= 0, got {self}")
        if self.kl_coef < 0.0:
            raise ValueError(f"kl_coef must be >= 0, got {self.kl_coef}")

    @classmethod
    def from_config(cls, config) -> "LossConfig":
        """The loss of an experiment config (`config.loss`; 0 chunk sizes mean none)."""
        c = config.loss
        return cls(eps_low=c.eps_low, eps_high=c.eps_high, kl_coef=c.kl_coef,
                   seq_chunk=c.seq_chunk or None, vocab_chunk=c.vocab_chunk or None)


# Metric sums a micro-batch returns; each is divided by N at the end (see `finalize_metrics`).
SUM_METRICS = ("loss", "pg_loss", "kl", "clip_frac_low", "clip_frac_high", "ratio_mean",
               "entropy_mean", "logprob_diff_mean_abs")


def loss_token_mask(batch: TrainBatch) -> jax.Array:
    """float32[B, T]: the loss mask, restricted to tokens that have a prediction."""
    return jnp.where(prediction_mask(batch.segment_ids), batch.loss_mask, 0.0).astype(jnp.float32)


def per_token_terms(logp: jax.Array, batch: TrainBatch, mask: jax.Array, cfg: LossConfig) -> dict:
    """Per-token pg, kl, ratio and clip indicators [B, T]; exactly 0 where mask == 0."""
    on = mask > 0
    delta = jnp.where(on, logp - batch.old_logprobs, 0.0)  # sanitised: masked tokens see 0
    adv = jnp.where(on, batch.advantages, 0.0)
    ratio = jnp.exp(delta)
    clipped = jnp.clip(ratio, 1.0 - cfg.eps_low, 1.0 + cfg.eps_high)
    pg = -jnp.minimum(ratio * adv, clipped * adv)
    terms = {
        "pg": jnp.where(on, pg, 0.0),
        "ratio": jnp.where(on, ratio, 0.0),
        # The clip binds (gradient 0) when the ratio left the range in the advantage's direction.
        "clip_low": (on & (adv < 0) & (ratio < 1.0 - cfg.eps_low)).astype(jnp.float32),
        "clip_high": (on & (adv > 0) & (ratio > 1.0 + cfg.eps_high)).astype(jnp.float32),
    }
    if cfg.kl_coef > 0.0:
        log_r = jnp.where(on, batch.ref_logprobs - logp, 0.0)
        terms["kl"] = jnp.where(on, jnp.exp(log_r) - log_r - 1.0, 0.0)
    else:
        terms["kl"] = jnp.zeros_like(logp)
    return terms


def loss_and_metric_sums(logp: jax.Array, entropy: jax.Array, batch: TrainBatch, cfg: LossConfig,
                         num_tokens: jax.Array) -> tuple[jax.Array, dict]:
    """(loss, metric sums) of one (micro-)batch; loss is already divided by `num_tokens` (N).

    Metric sums are Σ over model tokens (not yet divided by N), so micro-batches add up.
    """
    mask = loss_token_mask(batch)
    terms = per_token_terms(logp, batch, mask, cfg)
    w = jnp.where(mask > 0, batch.token_weights, 0.0)
    pg_sum = jnp.sum(w * terms["pg"])
    kl_sum = jnp.sum(terms["kl"])
    loss = (pg_sum + cfg.kl_coef * kl_sum) / num_tokens
    on = mask > 0
    sg = jax.lax.stop_gradient
    sums = {
        "loss": sg(pg_sum + cfg.kl_coef * kl_sum),
        "pg_loss": sg(pg_sum),
        "kl": sg(kl_sum),
        "clip_frac_low": jnp.sum(terms["clip_low"]),
        "clip_frac_high": jnp.sum(terms["clip_high"]),
        "ratio_mean": sg(jnp.sum(terms["ratio"])),
        "entropy_mean": sg(jnp.sum(jnp.where(on, entropy, 0.0))),
        "logprob_diff_mean_abs": sg(jnp.sum(jnp.where(on, jnp.abs(logp - batch.old_logprobs), 0.0))),
    }
    return loss, sums


def finalize_metrics(sums: dict, num_tokens: jax.Array) -> dict:
    """Token means from the summed metrics; N is also reported as `num_model_tokens`."""
    out = {k: sums[k] / num_tokens for k in SUM_METRICS}
    out["num_model_tokens"] = num_tokens
    return out


def policy_loss(logp: jax.Array, entropy: jax.Array, batch: TrainBatch,
                cfg: LossConfig) -> tuple[jax.Array, dict]:
    """Whole-batch loss and token-mean metrics (N = this batch's model-token count)."""
    n = jnp.maximum(jnp.sum(loss_token_mask(batch)), 1.0)
    loss, sums = loss_and_metric_sums(logp, entropy, batch, cfg, n)
    return loss, finalize_metrics(sums, n)
