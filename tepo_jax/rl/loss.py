"""The policy loss: token-level clipped policy gradient, optional ResT token weights, optional k3
KL to a frozen reference, aggregated over the batch in one of three modes (docs/design.md, "Loss").

Per model token t (m_t = 1), with logp the current policy's logprob, A the advantage and
w the ResT weight:

    ρ_t   = exp(logp_t − old_logp_t)
    pg_t  = −min(ρ_t · A_t, clip(ρ_t, 1 − ε_low, 1 + ε_high) · A_t)
    kl_t  = exp(ref_t − logp_t) − (ref_t − logp_t) − 1                    (k3, ≥ 0)
    ℓ_t   = w_t · pg_t + β · kl_t

ResT weights re-weight the policy-gradient term only (they are defined as weights of the policy
gradient). Aggregation (`AggMode`, config.loss.agg_mode), with s(t) the sequence (trajectory)
of token t, n_s its model-token count, S the number of sequences with n_s > 0, N = Σ_s n_s:

    token_mean                loss = Σ_t m_t · ℓ_t / N                   (default; verl's token-mean)
    seq_mean_token_mean       loss = Σ_t m_t · ℓ_t / n_s(t) / S         (Tunix/TRL GRPO)
    seq_mean_token_sum_norm   loss = Σ_t m_t · ℓ_t / (S · L)            (Dr. GRPO; L = norm_len)

Every mode is Σ_t a_t · ℓ_t / D: per-token aggregation weights a_t (m_t, or m_t / n_s(t)),
which depend only on the token's own row because a sequence lives in one row, and one scalar
D of the whole batch. D is passed in explicitly, so that a micro-batch's loss uses the
normaliser of the whole batch and summed micro-batch gradients equal the full-batch gradient
(see `train_step.py`).

Prompt, tool-result and padding tokens (m_t = 0) carry no loss: their per-token terms are
computed from sanitised inputs and then selected away, so their gradient is exactly zero even
if their inputs are garbage.
"""
from __future__ import annotations

import dataclasses
import enum
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from tepo_jax.config import LOSS_AGG_MODES
from tepo_jax.rl.batch import TrainBatch
from tepo_jax.seqlogprob import prediction_mask

# The names are config.LOSS_AGG_MODES (the one list): AggMode.TOKEN_MEAN.value == "token_mean", etc.
AggMode = enum.Enum("AggMode", {name.upper(): name for name in LOSS_AGG_MODES})


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Loss hyper-parameters.

    eps_low / eps_high: the ratio clip range [1 − eps_low, 1 + eps_high]. Default 0.2 / 0.2
      (PPO's symmetric clip). DAPO's clip-higher, eps_high=0.28, is the config default
      (tepo_jax/config.py, docs/design.md).
    kl_coef: β of the k3 KL to the reference model; 0 disables it (ref_logprobs are then not
      read and the `kl` metric is 0).
    agg_mode: how per-token losses become the batch loss (module docstring); an AggMode or its
      config string. Default token_mean (ours, as before).
    norm_len: L of seq_mean_token_sum_norm (Dr. GRPO's constant); `from_config` sets it to
      config.rollout.max_tokens, the most model tokens a trajectory can have. Unused otherwise.
    seq_chunk: sequence positions per chunk of the logprob computation (memory B·seq_chunk·V);
      None computes all logits at once.
    vocab_chunk: optional vocabulary chunk inside `logprob_and_entropy`.
    policy_temperature: τ of the trained policy softmax(logits / τ): its logprobs enter the
      ratio and the KL (the reference's at τ too). 1, the default, trains the model's own
      distribution; `from_config` sets the sampling temperature where `loss.tempered_policy`
      (TRL's and verl's convention; the sampler then records logprobs at the same τ).
    """

    eps_low: float = 0.2
    eps_high: float = 0.2
    kl_coef: float = 0.0
    agg_mode: AggMode = AggMode.TOKEN_MEAN
    norm_len: int = 0
    seq_chunk: Optional[int] = 256
    vocab_chunk: Optional[int] = None
    policy_temperature: float = 1.0

    def __post_init__(self):
        # Configs (ml_collections) carry strings; turn them into the enum once, here.
        object.__setattr__(self, "agg_mode", AggMode(self.agg_mode))
        if not (0.0 <= self.eps_low < 1.0) or self.eps_high < 0.0:
            raise ValueError(f"need 0 <= eps_low < 1 and eps_high >= 0, got {self}")
        if self.kl_coef < 0.0:
            raise ValueError(f"kl_coef must be >= 0, got {self.kl_coef}")
        if not 0.0 < self.policy_temperature < float("inf"):
            raise ValueError(f"policy_temperature must be a finite number > 0, got {self.policy_temperature}")
        if self.agg_mode is AggMode.SEQ_MEAN_TOKEN_SUM_NORM and self.norm_len < 1:
            raise ValueError(f"agg_mode {self.agg_mode.value} needs norm_len >= 1, got {self.norm_len}")

    @classmethod
    def from_config(cls, config) -> "LossConfig":
        """The loss of an experiment config (`config.loss`; 0 chunk sizes mean none)."""
        c = config.loss
        return cls(eps_low=c.eps_low, eps_high=c.eps_high, kl_coef=c.kl_coef, agg_mode=c.agg_mode,
                   norm_len=config.rollout.max_tokens,
                   seq_chunk=c.seq_chunk or None, vocab_chunk=c.vocab_chunk or None,
                   policy_temperature=policy_temperature(config))


def policy_temperature(config) -> float:
    """τ of the policy a run trains and whose logprobs its sampler records: the sampling
    temperature with `loss.tempered_policy`, else 1 (docs/design.md, Loss)."""
    return float(config.rollout.temperature) if config.loss.tempered_policy else 1.0


def policy_mismatch(config) -> str:
    """A warning when a run's rollouts are not drawn from the policy it trains ('' if they
    are): top-p/top-k truncation, or a temperature other than the policy's."""
    r = config.rollout
    tempered = r.temperature not in (0.0, policy_temperature(config))
    if not (tempered or r.top_p < 1.0 or r.top_k > 0):
        return ""
    trained = (f"the tempered policy softmax(logits / {r.temperature:g})" if config.loss.tempered_policy
               else "the temperature-1 policy (loss.tempered_policy=True trains softmax(logits / T), as TRL and verl)")
    return (f"rollout.temperature={r.temperature:g}, top_p={r.top_p:g}, top_k={r.top_k}: samples come from "
            f"that tempered or truncated distribution, while the loss's ratio and gradient are those of "
            f"{trained} (docs/design.md, Loss)")


# Metric sums a micro-batch returns. The objective and its two terms ("loss", "pg_loss", "kl")
# are Σ a_t·(…) and are divided by the loss denominator D; the diagnostics are plain token sums
# divided by N (see `finalize_metrics`). With token_mean, D = N and a_t = m_t.
LOSS_METRICS = ("loss", "pg_loss", "kl")
SUM_METRICS = LOSS_METRICS + ("clip_frac_low", "clip_frac_high", "ratio_mean", "entropy_mean",
                              "logprob_diff_mean_abs")


def loss_token_mask(batch: TrainBatch) -> jax.Array:
    """float32[B, T]: the loss mask, restricted to tokens that have a prediction."""
    return jnp.where(prediction_mask(batch.segment_ids), batch.loss_mask, 0.0).astype(jnp.float32)


def _sequence_bounds(segment_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """bool[B, T] (first token of its sequence, last token of its sequence); a sequence is a
    run of equal segment ids in a row (padding runs of id 0 included; callers mask them)."""
    seg = segment_ids
    start = jnp.concatenate([jnp.ones_like(seg[:, :1], bool), seg[:, 1:] != seg[:, :-1]], axis=1)
    end = jnp.concatenate([seg[:, :-1] != seg[:, 1:], jnp.ones_like(seg[:, :1], bool)], axis=1)
    return start, end


def sequence_token_counts(segment_ids: jax.Array, mask: jax.Array) -> jax.Array:
    """float32[B, T]: Σ mask over the sequence of token t (its n_s), 0 on padding.

    Row-local scans only (no scatter): with the running sum c of the mask, n_s = c at the
    sequence's last token − c just before its first; c is non-decreasing, so "the nearest start
    at or before t" is a running max and "the nearest end at or after t" a reverse running min.
    """
    start, end = _sequence_bounds(segment_ids)
    c = jnp.cumsum(mask, axis=1)
    before_start = jax.lax.cummax(jnp.where(start, c - mask, 0.0), axis=1)
    at_end = jax.lax.cummin(jnp.where(end, c, jnp.inf), axis=1, reverse=True)
    return jnp.where(segment_ids != 0, at_end - before_start, 0.0)


def num_sequences(segment_ids: jax.Array, mask: jax.Array) -> jax.Array:
    """float32 []: sequences (non-padding segments) with at least one model token (S)."""
    start, _ = _sequence_bounds(segment_ids)
    counts = sequence_token_counts(segment_ids, mask)
    return jnp.sum(jnp.where(start & (segment_ids != 0) & (counts > 0), 1.0, 0.0))


def _token_weights_ones(batch: TrainBatch, mask: jax.Array) -> jax.Array:
    return jnp.where(mask > 0, 1.0, 0.0)


def _token_weights_inv_len(batch: TrainBatch, mask: jax.Array) -> jax.Array:
    counts = sequence_token_counts(batch.segment_ids, mask)
    return jnp.where(mask > 0, 1.0 / jnp.maximum(counts, 1.0), 0.0)


# AggMode -> a_t [B, T] (row-local) and D [] (of the whole batch); chosen outside jit.
_AGG_WEIGHTS = {AggMode.TOKEN_MEAN: _token_weights_ones,
                AggMode.SEQ_MEAN_TOKEN_MEAN: _token_weights_inv_len,
                AggMode.SEQ_MEAN_TOKEN_SUM_NORM: _token_weights_ones}
_AGG_DENOMINATORS = {
    AggMode.TOKEN_MEAN: lambda b, mask, cfg: jnp.maximum(jnp.sum(mask), 1.0),
    AggMode.SEQ_MEAN_TOKEN_MEAN: lambda b, mask, cfg: jnp.maximum(num_sequences(b.segment_ids, mask), 1.0),
    AggMode.SEQ_MEAN_TOKEN_SUM_NORM: lambda b, mask, cfg: (
        jnp.maximum(num_sequences(b.segment_ids, mask), 1.0) * float(cfg.norm_len)),
}


def aggregation_weights(batch: TrainBatch, mask: jax.Array, cfg: LossConfig) -> jax.Array:
    """float32[B, T]: a_t of `cfg.agg_mode` (0 where mask == 0); needs only each row itself."""
    return _AGG_WEIGHTS[cfg.agg_mode](batch, mask)


def loss_denominator(batch: TrainBatch, cfg: LossConfig) -> jax.Array:
    """float32 []: D of `cfg.agg_mode` for `batch` (pass the whole batch, not a micro-batch)."""
    return _AGG_DENOMINATORS[cfg.agg_mode](batch, loss_token_mask(batch), cfg)


# Log-ratios are clamped to ±MAX_LOG_RATIO before exp (a ratio of ~5e8 at most). Past ~88, exp
# overflows float32: one token the policy now finds e^88 times likelier than when it was sampled
# made the loss inf·0 = NaN, and the whole step was skipped for it. The clamp's gradient is 0,
# as the clipped branch's is; values inside the bound are untouched.
MAX_LOG_RATIO = 20.0


def _clamped_log_ratio(on: jax.Array, log_ratio: jax.Array) -> jax.Array:
    return jnp.clip(jnp.where(on, log_ratio, 0.0), -MAX_LOG_RATIO, MAX_LOG_RATIO)  # masked tokens see 0


def per_token_terms(logp: jax.Array, batch: TrainBatch, mask: jax.Array, cfg: LossConfig) -> dict:
    """Per-token pg, kl, ratio and clip indicators [B, T]; exactly 0 where mask == 0."""
    on = mask > 0
    delta = _clamped_log_ratio(on, logp - batch.old_logprobs)
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
        log_r = _clamped_log_ratio(on, batch.ref_logprobs - logp)
        terms["kl"] = jnp.where(on, jnp.exp(log_r) - log_r - 1.0, 0.0)
    else:
        terms["kl"] = jnp.zeros_like(logp)
    return terms


class TokenLossInputs(NamedTuple):
    """What `token_losses` reads per token, [B, T] each (batch convention); `token_loss_inputs`."""

    mask: jax.Array           # m_t (the loss mask, restricted to tokens with a prediction)
    old_logprobs: jax.Array
    advantages: jax.Array
    ref_logprobs: jax.Array
    pg_weight: jax.Array      # a_t · w_t (0 where m_t = 0)
    kl_weight: jax.Array      # a_t
    denominator: jax.Array    # D of the whole batch, at every token


def token_loss_inputs(batch: TrainBatch, cfg: LossConfig, denominator: jax.Array) -> TokenLossInputs:
    """The per-token inputs of `token_losses` for `batch`, with the whole batch's D."""
    mask = loss_token_mask(batch)
    a = aggregation_weights(batch, mask, cfg)
    w = jnp.where(mask > 0, batch.token_weights, 0.0)
    return TokenLossInputs(mask, batch.old_logprobs, batch.advantages, batch.ref_logprobs, a * w, a,
                           jnp.broadcast_to(denominator, mask.shape))


def token_losses(logp: jax.Array, inputs: TokenLossInputs, cfg: LossConfig) -> jax.Array:
    """(a_t · w_t · pg_t + β · a_t · kl_t) / D per token: the loss is their sum (the loss of
    `loss_and_metric_sums`, term by term). Elementwise in logp, 0 with a 0 gradient where
    m_t = 0, so `seqlogprob.head_loss` can form its gradient chunk by chunk."""
    terms = per_token_terms(logp, inputs, inputs.mask, cfg)
    return (inputs.pg_weight * terms["pg"] + cfg.kl_coef * (inputs.kl_weight * terms["kl"])) / inputs.denominator


def loss_and_metric_sums(logp: jax.Array, entropy: jax.Array, batch: TrainBatch, cfg: LossConfig,
                         num_tokens: jax.Array,
                         denominator: Optional[jax.Array] = None) -> tuple[jax.Array, dict]:
    """(loss, metric sums) of one (micro-)batch; loss is already divided by `denominator` (D).

    `num_tokens` (N) and `denominator` are of the whole batch (`loss_denominator`); D may be
    left out for token_mean, where it is N. Metric sums are not yet divided (by D for the
    LOSS_METRICS, by N for the rest), so micro-batches add up.
    """
    if denominator is None:
        if cfg.agg_mode is not AggMode.TOKEN_MEAN:
            raise ValueError(f"agg_mode {cfg.agg_mode.value}: pass the whole batch's "
                             "loss_denominator(batch, cfg)")
        denominator = num_tokens
    mask = loss_token_mask(batch)
    terms = per_token_terms(logp, batch, mask, cfg)
    on = mask > 0
    a = aggregation_weights(batch, mask, cfg)
    w = jnp.where(on, batch.token_weights, 0.0)
    pg_sum = jnp.sum(a * w * terms["pg"])
    kl_sum = jnp.sum(a * terms["kl"])
    loss = (pg_sum + cfg.kl_coef * kl_sum) / denominator
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


def finalize_metrics(sums: dict, num_tokens: jax.Array, denominator: Optional[jax.Array] = None) -> dict:
    """Metrics from the summed ones: loss, pg_loss and kl aggregated as the loss (÷ D, which
    defaults to N: token_mean), the rest token means (÷ N); N is reported as `num_model_tokens`."""
    d = num_tokens if denominator is None else denominator
    out = {k: sums[k] / (d if k in LOSS_METRICS else num_tokens) for k in SUM_METRICS}
    out["num_model_tokens"] = num_tokens
    return out


def policy_loss(logp: jax.Array, entropy: jax.Array, batch: TrainBatch,
                cfg: LossConfig) -> tuple[jax.Array, dict]:
    """Whole-batch loss and metrics (N and D of this batch)."""
    n = jnp.maximum(jnp.sum(loss_token_mask(batch)), 1.0)
    d = loss_denominator(batch, cfg)
    loss, sums = loss_and_metric_sums(logp, entropy, batch, cfg, n, d)
    return loss, finalize_metrics(sums, n, d)
