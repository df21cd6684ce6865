"""The optax optimizer of the RL (and SFT) step: global-norm clipping, then AdamW on a
warmup + cosine or warmup + constant learning-rate schedule.

Weight decay applies to matrices (ndim >= 2: projections, embeddings) and not to vectors
(norm scales, biases) unless `decay_vectors` is set, the usual LLM fine-tuning convention.
"""
from __future__ import annotations

import dataclasses
import enum

import jax
import optax


class ScheduleKind(enum.Enum):
    CONSTANT = "constant"   # linear warmup, then constant
    COSINE = "cosine"       # linear warmup, then cosine decay to end_lr_ratio · lr


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    learning_rate: float = 1e-6
    schedule: ScheduleKind = ScheduleKind.CONSTANT
    warmup_steps: int = 0
    total_steps: int = 1000          # cosine horizon (warmup included)
    end_lr_ratio: float = 0.0        # cosine floor, as a fraction of learning_rate
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.01
    decay_vectors: bool = False
    max_grad_norm: float = 1.0       # <= 0 disables clipping

    def __post_init__(self):
        if not isinstance(self.schedule, ScheduleKind):
            object.__setattr__(self, "schedule", ScheduleKind(self.schedule))

    @classmethod
    def for_sft(cls, config) -> "OptimConfig":
        """The SFT optimizer of an experiment config (`config.sft`, 10% warmup)."""
        c = config
        return cls(learning_rate=c.sft.lr, schedule=c.sft.schedule, warmup_steps=c.sft.steps // 10,
                   total_steps=max(c.sft.steps, 1), weight_decay=c.optim.weight_decay,
                   max_grad_norm=c.optim.clip_norm)

    @classmethod
    def for_rl(cls, config) -> "OptimConfig":
        """The RL optimizer of an experiment config (`config.optim`, over `train.steps`)."""
        c = config
        return cls(learning_rate=c.optim.lr, schedule=c.optim.schedule, warmup_steps=c.optim.warmup_steps,
                   total_steps=max(c.train.steps, 1), b1=c.optim.b1, b2=c.optim.b2,
                   weight_decay=c.optim.weight_decay, max_grad_norm=c.optim.clip_norm)


def build_schedule(cfg: OptimConfig) -> optax.Schedule:
    """Learning rate as a function of the optimizer step (0-based)."""
    warmup = max(cfg.warmup_steps, 0)
    if cfg.schedule is ScheduleKind.COSINE:
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0 if warmup else cfg.learning_rate, peak_value=cfg.learning_rate,
            warmup_steps=warmup, decay_steps=max(cfg.total_steps, warmup + 1),
            end_value=cfg.learning_rate * cfg.end_lr_ratio)
    if warmup == 0:
        return optax.constant_schedule(cfg.learning_rate)
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.learning_rate, warmup),
                                 optax.constant_schedule(cfg.learning_rate)], [warmup])


def _decay_mask(decay_vectors: bool):
    return lambda params: jax.tree.map(lambda p: decay_vectors or p.ndim >= 2, params)


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformationExtraArgs:
    """optax.clip_by_global_norm that takes the norm as the extra arg `grad_norm` when the
    caller has it: the train step computes it anyway, for its finiteness check and its metric,
    outside the `lax.cond` of the update, where XLA cannot share it with a norm computed inside
    (a second pass over every gradient). Without `grad_norm` it computes the norm itself. Same
    clipping and the same (empty) state as optax's, so checkpoints are unchanged."""

    def update(updates, state, params=None, *, grad_norm=None, **extra_args):
        del params, extra_args
        norm = optax.global_norm(updates) if grad_norm is None else grad_norm
        keep = norm < max_norm   # a scalar: the norm of the whole tree
        return jax.tree.map(lambda t: jax.lax.select(keep, t, (t / norm.astype(t.dtype)) * max_norm), updates), state

    return optax.GradientTransformationExtraArgs(optax.init_empty_state, update)


def build_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
    parts = []
    if cfg.max_grad_norm > 0:
        parts.append(clip_by_global_norm(cfg.max_grad_norm))
    parts.append(optax.adamw(build_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                             weight_decay=cfg.weight_decay, mask=_decay_mask(cfg.decay_vectors)))
    return optax.chain(*parts)
