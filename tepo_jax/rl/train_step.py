"""The RL train step: `train_step(state, batch) -> (state, metrics)`, one pure function jitted
once with explicit in/out shardings and the state donated.

Usage (the driver):

    model = create_sharded_model(cfg, mesh, remat=True)          # or load_hf(...)
    optimizer = build_optimizer(OptimConfig(...))
    model_def, state, shardings = create_train_state(model, optimizer, mesh, seed=0)
    step_fn = make_train_step(model_def, optimizer, LossConfig(...), mesh, shardings,
                              batch_sharding(mesh), micro_batches=2, reference=kl_coef > 0)
    packed = pack_sequences(seqs, row_multiple=batch_shards * micro_batches)
    batch = jax.device_put(packed.batch, batch_sharding(mesh))
    state, metrics = step_fn(state, batch)       # `state` passed in is donated: do not reuse it
    state, metrics = step_fn(state, batch, ref_params)   # reference=True: KL to ref_params

The parameters live in `TrainState` as a plain nested dict (`nnx.to_pure_dict`), so the state is
an nnx-free pytree that jit and orbax handle directly; `ModelDef.merge(params)` rebuilds the
NNX model inside the jitted function.

Gradient accumulation: the batch is split along B into `micro_batches` interleaved micro-batches
(rows i·M + m form micro-batch m, so every batch shard holds a slice of each micro-batch) and a
`lax.scan` sums their gradients. Each micro-batch loss is divided by the loss denominator D of
the *whole* batch (N model tokens, or the number of sequences: `loss.loss_denominator`), and its
per-token aggregation weights need only their own row (a sequence lives in one row), so the
summed gradient is exactly the full-batch gradient in every aggregation mode.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from tepo_jax.models.decoder import BATCH_AXES
from tepo_jax.rl.batch import TrainBatch
from tepo_jax.rl.loss import (SUM_METRICS, LossConfig, finalize_metrics, loss_and_metric_sums,
                              loss_denominator, loss_token_mask, token_loss_inputs, token_losses)
from tepo_jax.seqlogprob import head_loss, token_logprob_entropy
from tepo_jax.sharding import param_shardings, replicated
from tepo_jax.xla_options import program_options

PyTree = Any


@flax.struct.dataclass
class ModelDef:
    """The static part of a model: NNX graphdef plus its non-parameter constants (e.g. rope
    inverse frequencies), which are not trained and not checkpointed."""

    graphdef: Any = flax.struct.field(pytree_node=False)
    constants: Any = flax.struct.field(pytree_node=False)

    def merge(self, params: PyTree) -> nnx.Module:
        return nnx.merge(self.graphdef, params, self.constants)


@flax.struct.dataclass
class TrainState:
    params: PyTree       # nested dict of arrays (nnx.to_pure_dict of the nnx.Param state)
    opt_state: PyTree    # optax state
    step: jax.Array      # int32 [], number of optimizer updates done
    rng: jax.Array       # uint32 [2], raw PRNG key, advanced every step


def split_model(model: nnx.Module) -> tuple[ModelDef, PyTree]:
    """(ModelDef, params as a pure dict)."""
    graphdef, params, constants = nnx.split(model, nnx.Param, ...)
    return ModelDef(graphdef, nnx.to_pure_dict(constants)), nnx.to_pure_dict(params)


def model_param_shardings(model: nnx.Module, mesh: Mesh) -> PyTree:
    """NamedSharding per parameter (pure-dict tree) from the specs declared in the model."""
    return nnx.to_pure_dict(param_shardings(nnx.state(model, nnx.Param), mesh))


def train_state_shardings(params_sharding: PyTree, abstract_params: PyTree,
                          optimizer: optax.GradientTransformation, mesh: Mesh) -> TrainState:
    """Shardings of every TrainState leaf: optimizer moments follow their parameter, the rest
    (counts, step, rng) is replicated."""
    abstract_opt = jax.eval_shape(optimizer.init, abstract_params)
    opt = optax.tree_map_params(optimizer, lambda _, s: s, abstract_opt, params_sharding,
                                transform_non_params=lambda _: replicated(mesh))
    return TrainState(params=params_sharding, opt_state=opt, step=replicated(mesh), rng=replicated(mesh))


def create_train_state(model: nnx.Module, optimizer: optax.GradientTransformation, mesh: Mesh,
                       seed: int = 0) -> tuple[ModelDef, TrainState, TrainState]:
    """(model_def, state, state_shardings), every array placed on its sharding.

    The parameters are copied, so the step donating `state` never invalidates `model`.
    """
    model_def, params = split_model(model)
    p_shard = model_param_shardings(model, mesh)
    shardings = train_state_shardings(p_shard, jax.eval_shape(lambda: params), optimizer, mesh)
    params = jax.tree.map(lambda x, s: jax.device_put(x, s, may_alias=False), params, p_shard)
    opt_state = jax.jit(optimizer.init, out_shardings=shardings.opt_state)(params)
    state = TrainState(params=params, opt_state=opt_state,
                       step=jax.device_put(jnp.zeros((), jnp.int32), replicated(mesh)),
                       rng=jax.device_put(jax.random.PRNGKey(seed), replicated(mesh)))
    return model_def, state, shardings


def forward_logprobs(model_def: ModelDef, params: PyTree, batch: TrainBatch, cfg: LossConfig,
                     loss_tokens_only: bool = False) -> tuple[jax.Array, jax.Array]:
    """(logprob, entropy) [B, T] of every token under `params`, batch convention (rl/batch.py).

    `loss_tokens_only`: only the loss tokens' values are needed (the others read 0), so the
    output head skips the chunks of prompt, tool-result and padding positions
    (`seqlogprob.sequence_logprob_entropy(needed=...)`)."""
    model = model_def.merge(params)
    hidden, _ = model.hidden_states(batch.tokens, batch.positions, segment_ids=batch.segment_ids)
    needed = loss_token_mask(batch) > 0 if loss_tokens_only else None
    return token_logprob_entropy(hidden, model.unembed_kernel(), batch.tokens, batch.segment_ids,
                                 cfg.seq_chunk, cfg.vocab_chunk, needed=needed,
                                 logit_scale=1.0 / cfg.policy_temperature)


def forward_loss(model_def: ModelDef, params: PyTree, batch: TrainBatch, cfg: LossConfig,
                 token_loss: Callable, inputs: PyTree) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(loss, logprob, entropy): loss = Σ_t token_loss(logprob, inputs)_t over the loss tokens
    of `batch` under `params`, through `seqlogprob.head_loss`, which forms the loss's gradient
    through the output head in its forward pass (no logits recomputed in the backward).
    `token_loss` is elementwise in logprob (e.g. `rl.loss.token_losses`; `head_loss` says what
    it must do off the loss tokens) and `inputs` holds its per-token [B, T] inputs. logprob
    and entropy [B, T] (loss tokens only, the rest 0) carry no gradient."""
    model = model_def.merge(params)
    hidden, _ = model.hidden_states(batch.tokens, batch.positions, segment_ids=batch.segment_ids)
    return head_loss(hidden, model.unembed_kernel(), batch.tokens, batch.segment_ids,
                     loss_token_mask(batch) > 0, token_loss, inputs, cfg.seq_chunk, cfg.vocab_chunk,
                     logit_scale=1.0 / cfg.policy_temperature)


def split_micro_batches(batch: TrainBatch, micro_batches: int) -> TrainBatch:
    """[B, T] -> [M, B/M, T]; micro-batch m = rows m, m + M, m + 2M, … (interleaved)."""
    b = batch.tokens.shape[0]
    if b % micro_batches:
        raise ValueError(f"batch size {b} is not divisible by micro_batches={micro_batches}")
    return jax.tree.map(lambda x: jnp.swapaxes(x.reshape(b // micro_batches, micro_batches, -1), 0, 1),
                        batch)


def with_reference_logprobs(model_def: ModelDef, ref_params: Optional[PyTree], batch: TrainBatch,
                            cfg: LossConfig) -> TrainBatch:
    """`batch` with ref_logprobs computed from `ref_params` (no gradient); as it is without them."""
    if ref_params is None:
        return batch
    ref, _ = forward_logprobs(model_def, ref_params, batch, cfg, loss_tokens_only=True)
    return batch._replace(ref_logprobs=jax.lax.stop_gradient(ref))


def accumulate_gradients(model_def: ModelDef, params: PyTree, batch: TrainBatch, cfg: LossConfig,
                         micro_batches: int = 1, mesh: Optional[Mesh] = None,
                         grad_shardings: Optional[PyTree] = None,
                         ref_params: Optional[PyTree] = None) -> tuple[PyTree, dict]:
    """(grads, metrics): the full-batch loss gradient, over micro-batches, and the loss metrics
    (`finalize_metrics`, with N and the loss denominator D of the whole batch).

    With `ref_params`, each micro-batch's reference logprobs are computed here, beside its loss
    (one program, no host round trip, one micro-batch of reference activations at a time);
    without, the batch's own `ref_logprobs` are used."""
    num_tokens = jnp.maximum(jnp.sum(loss_token_mask(batch)), 1.0)
    denominator = loss_denominator(batch, cfg)

    def micro_loss(p, mb):
        mb = with_reference_logprobs(model_def, ref_params, mb, cfg)
        loss, logp, entropy = forward_loss(model_def, p, mb, cfg, functools.partial(token_losses, cfg=cfg),
                                           token_loss_inputs(mb, cfg, denominator))
        return loss, loss_and_metric_sums(logp, entropy, mb, cfg, num_tokens, denominator)[1]

    grad_fn = jax.grad(micro_loss, has_aux=True)
    if micro_batches == 1:
        grads, sums = grad_fn(params, batch)
        return grads, finalize_metrics(sums, num_tokens, denominator)
    micro = split_micro_batches(batch, micro_batches)
    if mesh is not None:
        micro = jax.lax.with_sharding_constraint(micro, NamedSharding(mesh, P(None, BATCH_AXES, None)))
    constrain = (lambda g: g) if grad_shardings is None else (
        lambda g: jax.lax.with_sharding_constraint(g, grad_shardings))

    def body(carry, mb):
        grads, sums = grad_fn(params, mb)
        acc_g, acc_s = carry
        return (constrain(jax.tree.map(jnp.add, acc_g, grads)), jax.tree.map(jnp.add, acc_s, sums)), None

    zero_g = constrain(jax.tree.map(jnp.zeros_like, params))
    zero_s = {k: jnp.zeros((), jnp.float32) for k in SUM_METRICS}
    (grads, sums), _ = jax.lax.scan(body, (zero_g, zero_s), micro)
    return grads, finalize_metrics(sums, num_tokens, denominator)


def apply_update_if_finite(optimizer: optax.GradientTransformation, state: TrainState, grads: PyTree,
                           loss: jax.Array) -> tuple[TrainState, dict]:
    """The optimizer update of `state` by `grads`, or `state` unchanged (a new RNG key aside)
    when the loss or the gradients hold a NaN or inf.

    A non-finite update would make every parameter NaN, every later step NaN, and every later
    checkpoint useless; skipped, the run keeps its last good parameters and the driver decides
    (tepo_jax/train.py stops after `train.max_skipped_updates` in a row). A `lax.cond` rather
    than a select of old and new: the update stays one fused pass over the parameters (a
    select, or a check of the update's own norm, costs an extra pass: +0.3 s per step at 42M
    parameters on 2 CPU cores). So a finite gradient times an absurd learning rate is not
    caught here; `config.validate` refuses non-finite settings.
    Metrics: `grad_norm` (before clipping) and `update_skipped` (1.0 or 0.0).
    """
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    def update(state: TrainState) -> TrainState:
        # The norm goes to the clipping of `rl.optim.build_optimizer` (not computed twice);
        # any other optax optimizer ignores it.
        updates, opt_state = optax.with_extra_args_support(optimizer).update(
            grads, state.opt_state, state.params, grad_norm=grad_norm)
        return state.replace(params=optax.apply_updates(state.params, updates), opt_state=opt_state,
                             step=state.step + 1)

    new_state = jax.lax.cond(finite, update, lambda state: state, state)
    new_state = new_state.replace(rng=jax.random.split(state.rng)[0])
    return new_state, {"grad_norm": grad_norm, "update_skipped": 1.0 - finite.astype(jnp.float32)}


def make_train_step(model_def: ModelDef, optimizer: optax.GradientTransformation, loss_cfg: LossConfig,
                    mesh: Mesh, state_shardings: TrainState, batch_sharding: NamedSharding,
                    micro_batches: int = 1, schedule: Optional[optax.Schedule] = None,
                    reference: bool = False) -> Callable[..., tuple[TrainState, dict]]:
    """The jitted `train_step(state, batch) -> (state, metrics)`; build it once per run.

    `reference=True` (a KL term, loss.kl_coef > 0): the step is `train_step(state, batch,
    ref_params)` and computes the reference logprobs itself, in the same program as the
    update (`accumulate_gradients`); the batch's `ref_logprobs` are then not read. The
    reference params take the policy params' shardings.

    Metrics (replicated scalars): the loss metrics of `rl/loss.py` (loss, pg_loss and kl
    aggregated as the loss, the rest token means over the batch's model tokens; on-policy,
    `logprob_diff_mean_abs` is the sampler-vs-trainer logprob difference),
    `num_model_tokens`, `grad_norm` (before clipping), `update_skipped` (1.0 when a NaN/inf
    loss or gradient left the state as it was: `apply_update_if_finite`) and, with
    `schedule`, `learning_rate` (the one used for this update).
    """
    batch_shards = int(np.prod([mesh.shape[a] for a in BATCH_AXES]))

    def train_step(state: TrainState, batch: TrainBatch, ref_params: Optional[PyTree] = None):
        b = batch.tokens.shape[0]
        if b % (micro_batches * batch_shards):
            raise ValueError(f"batch size {b} must be a multiple of micro_batches × batch shards "
                             f"= {micro_batches} × {batch_shards} (use pack_sequences(row_multiple=...))")
        grads, metrics = accumulate_gradients(model_def, state.params, batch, loss_cfg, micro_batches,
                                              mesh, state_shardings.params, ref_params)
        new_state, update_metrics = apply_update_if_finite(optimizer, state, grads, metrics["loss"])
        metrics.update(update_metrics)
        if schedule is not None:
            metrics["learning_rate"] = jnp.asarray(schedule(state.step), jnp.float32)
        return new_state, metrics

    batch_shardings = TrainBatch(*([batch_sharding] * len(TrainBatch._fields)))
    in_shardings = (state_shardings, batch_shardings) + ((state_shardings.params,) if reference else ())
    return jax.jit(train_step, in_shardings=in_shardings,
                   out_shardings=(state_shardings, replicated(mesh)), donate_argnums=(0,),
                   compiler_options=program_options(mesh.devices.flat[0].platform))


def make_compute_logprobs(model_def: ModelDef, loss_cfg: LossConfig, mesh: Mesh, params_sharding: PyTree,
                          batch_sharding: NamedSharding) -> Callable[[PyTree, TrainBatch],
                                                                     tuple[jax.Array, jax.Array]]:
    """Jitted `compute_logprobs(params, batch) -> (logprobs, entropies)` [B, T] with the same
    chunked function the loss uses: recomputed old logprobs, or reference-model logprobs (pass
    the reference params; same ModelDef). Only tokens/positions/segment_ids are read."""
    def compute(params, batch):
        return forward_logprobs(model_def, params, batch, loss_cfg)

    batch_shardings = TrainBatch(*([batch_sharding] * len(TrainBatch._fields)))
    return jax.jit(compute, in_shardings=(params_sharding, batch_shardings),
                   out_shardings=(batch_sharding, batch_sharding),
                   compiler_options=program_options(mesh.devices.flat[0].platform))
