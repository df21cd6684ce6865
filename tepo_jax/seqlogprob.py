"""Per-token logprob and entropy of whole sequences, chunked so memory does not scale with T × V.

The training forward pass needs log p(token) for every token of [B, T] sequences. Materialising
[B, T, V] float32 logits (and their gradient) is the largest buffer of the step for real vocab
sizes (152k for Qwen2.5). Here the sequence axis is cut into chunks of `chunk_size` positions;
a scan computes one chunk's logits at a time and reduces them immediately with
`tepo_jax.logprobs.logprob_and_entropy` (the one definition the sampler also uses). The backward
pass recomputes a chunk's logits instead of storing them: peak memory is O(B · chunk_size · V)
in both directions.

The chunk has a custom VJP (entropy as a metric, the default): the forward keeps only
log Z = target_logit − logprob per token, and the backward recomputes the logits once and forms
d logits = g · (onehot(y) − exp(z − log Z)) in one pass, the closed form of the softmax
gradient. (Autodiff of a `jax.checkpoint`ed chunk instead re-ran the max / exp-sum / entropy
passes over [B, C, V] and differentiated through the max: three more passes per chunk.)
"""
from __future__ import annotations

import functools
from typing import Callable, Optional

import jax
import jax.numpy as jnp

from tepo_jax.logprobs import logprob_and_entropy


def _logits(hidden, kernel, logit_scale):
    """float32 logits [B, C, V] of the chunk, times `logit_scale` (1/T of a tempered policy)."""
    z = jnp.einsum("BCD,DV->BCV", hidden, kernel.astype(hidden.dtype), preferred_element_type=jnp.float32)
    return z if logit_scale == 1.0 else z * jnp.float32(logit_scale)


def _chunk_logprob_entropy(hidden, kernel, targets, vocab_chunk, entropy_grad, logit_scale):
    """hidden [B, C, D], kernel [D, V], targets int[B, C] -> (logprob, entropy) float32 [B, C]."""
    if not entropy_grad:
        return _chunk_metric_entropy(hidden, kernel, targets, vocab_chunk, logit_scale)
    return logprob_and_entropy(_logits(hidden, kernel, logit_scale), targets, vocab_chunk)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _chunk_metric_entropy(hidden, kernel, targets, vocab_chunk, logit_scale):
    """`_chunk_logprob_entropy` whose entropy carries no gradient (a metric)."""
    return logprob_and_entropy(_logits(hidden, kernel, logit_scale), targets, vocab_chunk)


def _log_z(logits, targets, lp):
    """log Z [B, C] of a chunk, as target logit − logprob."""
    target_logit = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return target_logit - lp


def _chunk_fwd(hidden, kernel, targets, vocab_chunk, logit_scale):
    logits = _logits(hidden, kernel, logit_scale)
    lp, ent = logprob_and_entropy(logits, targets, vocab_chunk)
    return (lp, ent), (hidden, kernel, targets, _log_z(logits, targets, lp))


def _head_grads(hidden, kernel, targets, logits, log_z, g, logit_scale):
    """(d hidden, d kernel) of Σ g · logprob(targets) through the head, from the chunk's
    (scaled) logits and log Z: d logits = g · (onehot(y) − exp(z − log Z)) · logit_scale."""
    onehot = jnp.arange(logits.shape[-1]) == targets[..., None]
    dz = g[..., None] * (onehot - jnp.exp(logits - log_z[..., None]))  # d logp / d z, [B, C, V]
    if logit_scale != 1.0:   # z = logit_scale · (hidden @ kernel)
        dz = dz * jnp.float32(logit_scale)
    dz = dz.astype(hidden.dtype)
    d_hidden = jnp.einsum("BCV,DV->BCD", dz, kernel.astype(hidden.dtype),
                          preferred_element_type=jnp.float32).astype(hidden.dtype)
    d_kernel = jnp.einsum("BCD,BCV->DV", hidden, dz,
                          preferred_element_type=jnp.float32).astype(kernel.dtype)
    return d_hidden, d_kernel


def _chunk_bwd(vocab_chunk, logit_scale, res, cts):
    hidden, kernel, targets, log_z = res
    g = cts[0]                                                        # the entropy's is dropped
    logits = _logits(hidden, kernel, logit_scale)
    return _head_grads(hidden, kernel, targets, logits, log_z, g, logit_scale) + (None,)


_chunk_metric_entropy.defvjp(_chunk_fwd, _chunk_bwd)


def sequence_logprob_entropy(hidden: jax.Array, kernel: jax.Array, targets: jax.Array,
                             chunk_size: Optional[int] = 256,
                             vocab_chunk: Optional[int] = None,
                             entropy_grad: bool = False,
                             needed: Optional[jax.Array] = None,
                             logit_scale: float = 1.0) -> tuple[jax.Array, jax.Array]:
    """hidden [B, T, D] (hidden[t] predicts targets[t]), kernel [D, V], targets int[B, T].

    Returns (logprob, entropy), float32 [B, T], of targets[t] under
    softmax(logit_scale · hidden[t] @ kernel): `logit_scale` = 1/T trains the policy at
    temperature T (the float32 logits are scaled, as the sampler scales its own).
    `chunk_size=None` (or >= T) computes all logits at once (the reference path).
    The entropy is a metric unless `entropy_grad` (e.g. an entropy bonus): by default it is
    stop-gradient'ed inside the chunk, so the backward scan does no work for it.

    `needed` (bool[B, T], optional): the positions whose values are used; the others may be
    returned as 0. The head (the [D, V] matmul, most of a small model's step) then runs only
    on chunks that hold a needed position (`_needed_positions_first`).
    """
    b, t, d = hidden.shape
    if needed is not None and chunk_size:
        return _needed_positions_first(hidden, kernel, targets, needed, chunk_size, vocab_chunk, entropy_grad,
                                       logit_scale)
    if not chunk_size or chunk_size >= t:
        return _chunk_logprob_entropy(hidden, kernel, targets, vocab_chunk, entropy_grad, logit_scale)
    n = -(-t // chunk_size)
    pad = n * chunk_size - t
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
    # [B, n·C, D] -> [n, B, C, D]: the batch axis (and its sharding) stays where it was.
    hs = jnp.moveaxis(hidden.reshape(b, n, chunk_size, d), 1, 0)
    ys = jnp.moveaxis(targets.reshape(b, n, chunk_size), 1, 0)
    # Entropy as a metric: the custom VJP saves only log Z per chunk. With an entropy gradient,
    # the checkpointed body has autodiff recompute the chunk's logits in the backward pass.
    chunk_fn = lambda h, y, k: _chunk_logprob_entropy(h, k, y, vocab_chunk, entropy_grad, logit_scale)  # noqa: E731
    body = jax.checkpoint(chunk_fn) if entropy_grad else chunk_fn

    def scan_body(_, xs):
        return None, body(xs[0], xs[1], kernel)

    _, (lp, ent) = jax.lax.scan(scan_body, None, (hs, ys))
    unchunk = lambda x: jnp.moveaxis(x, 0, 1).reshape(b, n * chunk_size)[:, :t]  # noqa: E731
    return unchunk(lp), unchunk(ent)


# Rows (B·C) of a chunk's [B·C, D] x [D, V] head matmul when skipping: chunks small enough
# that little of a partly needed one is waste, big enough that the matmul stays efficient (on a
# 2-core AVX2 host, head fwd+bwd of B=4, T=512, D=512, V=32k with 3/4 needed: 5.7 s whole,
# 4.6 s at 128 rows, 3.6 s at 256-512 rows, 4.5 s at 1024).
SKIP_CHUNK_ROWS = 512


class _NeededFirst:
    """Each row's positions reordered needed ones first (a stable sort, row-local, so the batch
    sharding holds) and cut into `n` chunks of `chunk`; `active[i]`: chunk i holds a needed
    position of some row. `chunks` / `unchunk` move [B, T, ...] arrays into and out of that
    layout ([n, B, chunk, ...], the batch axis and its sharding where they were)."""

    def __init__(self, needed, chunk_size):
        b, t = needed.shape
        # A power of two, at most SKIP_CHUNK_ROWS rows of the head's matmul per chunk.
        self.chunk = min(chunk_size or t, t, max(16, 1 << (SKIP_CHUNK_ROWS // b).bit_length() - 1))
        self.n = -(-t // self.chunk)
        self.b, self.t = b, t
        self.order = jnp.argsort(~needed, axis=1, stable=True)                   # needed first
        self.active = jnp.arange(self.n) * self.chunk < jnp.max(jnp.sum(needed, axis=1))

    def chunks(self, x, mode="constant"):
        """`mode`: how the last chunk is padded past T (jnp.pad's)."""
        order = self.order.reshape(self.order.shape + (1,) * (x.ndim - 2))
        x = jnp.take_along_axis(x, order, axis=1)
        x = jnp.pad(x, ((0, 0), (0, self.n * self.chunk - self.t)) + ((0, 0),) * (x.ndim - 2), mode=mode)
        return jnp.moveaxis(x.reshape((self.b, self.n, self.chunk) + x.shape[2:]), 1, 0)

    def unchunk(self, x):
        x = jnp.moveaxis(x, 0, 1).reshape((self.b, self.n * self.chunk) + x.shape[3:])[:, :self.t]
        inverse = jnp.argsort(self.order, axis=1)
        return jnp.take_along_axis(x, inverse.reshape(inverse.shape + (1,) * (x.ndim - 2)), axis=1)


def _needed_positions_first(hidden, kernel, targets, needed, chunk_size, vocab_chunk, entropy_grad, logit_scale):
    """`sequence_logprob_entropy` over the needed positions only, with static shapes.

    The positions are put needed first and cut into chunks (`_NeededFirst`); a chunk past every
    row's needed count is skipped by `lax.cond` (forward and backward), so the head runs on
    about max-row-count positions instead of T. In RL batches the prompts, tool results and
    padding are a third to a half of T. The values are put back in place; skipped positions
    read 0.
    """
    layout = _NeededFirst(needed, chunk_size)
    chunk_fn = lambda h, y, k: _chunk_logprob_entropy(h, k, y, vocab_chunk, entropy_grad, logit_scale)  # noqa: E731
    body = jax.checkpoint(chunk_fn) if entropy_grad else chunk_fn
    zeros = jnp.zeros((layout.b, layout.chunk), jnp.float32)

    def scan_body(_, xs):
        h, y, on = xs
        return None, jax.lax.cond(on, lambda: body(h, y, kernel), lambda: (zeros, zeros))

    xs = (layout.chunks(hidden), layout.chunks(targets), layout.active)
    _, (lp, ent) = jax.lax.scan(scan_body, None, xs)
    return layout.unchunk(lp), layout.unchunk(ent)


# --- The head with the loss's gradient formed in its forward pass -------------------------------
#
# A policy loss is a sum of per-token terms, ℓ_t(logprob_t) (rl/loss.py). Its gradient through
# the head needs only g_t = dℓ_t/dlogprob_t, which the forward pass can compute as soon as a
# chunk's logprobs exist, while that chunk's logits are still at hand. So the forward forms
# d logits, d hidden and d kernel at once and keeps only those ([B, T, D] and [D, V]); the
# backward pass scales them by the loss's cotangent. Against differentiating
# `sequence_logprob_entropy`, this drops the backward's recompute of every chunk's logits (one
# of the head's four [rows, D] × [D, V] matmuls, and an exp pass over [rows, V]) and stores no
# logits either. The values are those of autodiff through the chunked head: same logits, same
# log Z, same accumulation order of d kernel over chunks (last chunk first, as a transposed
# scan adds them).


def _head_loss_chunk(hidden, kernel, targets, needed, inputs, token_loss, vocab_chunk, logit_scale):
    """One chunk's (logprob, entropy, loss sum, d hidden, d kernel) of Σ token_loss over the
    needed positions."""
    logits = _logits(hidden, kernel, logit_scale)
    lp, ent = logprob_and_entropy(logits, targets, vocab_chunk)
    losses, pullback = jax.vjp(lambda x: jnp.where(needed, token_loss(x, inputs), 0.0), lp)
    (g,) = pullback(jnp.ones_like(losses))
    d_hidden, d_kernel = _head_grads(hidden, kernel, targets, logits, _log_z(logits, targets, lp), g, logit_scale)
    return lp, ent, jnp.sum(losses), d_hidden, d_kernel


def _fused_forward(token_loss, chunk_size, vocab_chunk, logit_scale, hidden, kernel, targets, needed, inputs):
    """((loss, logprob, entropy), (d hidden, d kernel)), over the needed positions' chunks."""
    layout = _NeededFirst(needed, chunk_size)
    zeros = jnp.zeros((layout.b, layout.chunk), jnp.float32)
    zero_dh = jnp.zeros((layout.b, layout.chunk, hidden.shape[-1]), hidden.dtype)

    def step(d_kernel, xs):   # carries d kernel; the rest is stacked per chunk
        h, y, need, inp, on = xs

        def compute():
            lp, ent, loss, dh, dk = _head_loss_chunk(h, kernel, y, need, inp, token_loss, vocab_chunk, logit_scale)
            return d_kernel + dk, (lp, ent, loss, dh)

        def skip():
            return d_kernel, (zeros, zeros, jnp.zeros((), jnp.float32), zero_dh)

        return jax.lax.cond(on, compute, skip)

    # The inputs are padded with their last value (not 0): a loss may divide by one of them.
    inputs = jax.tree.map(lambda x: layout.chunks(x, "edge"), inputs)
    xs = (layout.chunks(hidden), layout.chunks(targets), layout.chunks(needed), inputs, layout.active)
    d_kernel, (lp, ent, losses, d_hidden) = jax.lax.scan(step, jnp.zeros_like(kernel), xs, reverse=True)
    return (jnp.sum(losses), layout.unchunk(lp), layout.unchunk(ent)), (layout.unchunk(d_hidden), d_kernel)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _fused_head_loss(token_loss, chunk_size, vocab_chunk, logit_scale, hidden, kernel, targets, needed, inputs):
    return _fused_forward(token_loss, chunk_size, vocab_chunk, logit_scale, hidden, kernel, targets, needed,
                          inputs)[0]


def _fused_fwd(token_loss, chunk_size, vocab_chunk, logit_scale, hidden, kernel, targets, needed, inputs):
    return _fused_forward(token_loss, chunk_size, vocab_chunk, logit_scale, hidden, kernel, targets, needed,
                          inputs)


def _fused_bwd(token_loss, chunk_size, vocab_chunk, logit_scale, res, cts):
    d_hidden, d_kernel = res
    ct_loss = cts[0]   # logprob and entropy leave `head_loss` without a gradient
    return (ct_loss * d_hidden).astype(d_hidden.dtype), (ct_loss * d_kernel).astype(d_kernel.dtype), None, None, None


_fused_head_loss.defvjp(_fused_fwd, _fused_bwd)


def head_loss(hidden: jax.Array, kernel: jax.Array, tokens: jax.Array, segment_ids: jax.Array,
              needed: jax.Array, token_loss: Callable, inputs, chunk_size: Optional[int] = 256,
              vocab_chunk: Optional[int] = None,
              logit_scale: float = 1.0) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(loss, logprob, entropy) of a per-token loss through the output head, batch convention.

    loss = Σ_t token_loss(logprob, inputs)_t over the `needed` tokens (bool[B, T]: the loss's
    tokens); `token_loss(logprob [B, C], inputs chunk) -> [B, C]` is elementwise in logprob and
    is also evaluated at other tokens of a chunk, whose terms are dropped: it must stay finite
    there, with a finite gradient (sanitise what it does not read; `rl.loss.token_losses` does).
    `inputs` is a pytree of [B, T] arrays in batch convention (rl/batch.py), cut into chunks
    beside the logprobs. logprob and entropy [B, T] are those of `token_logprob_entropy(...,
    needed=needed, logit_scale=logit_scale)` and carry no gradient (metrics). The loss's gradient is formed in the
    forward pass (see above): differentiate a function that uses the loss linearly (`jax.grad`
    of it, as a train step does); evaluating it without a gradient does that work for nothing.
    """
    # Token t's logprob comes from hidden[t − 1]: targets and inputs move one position left.
    # The inputs' last position repeats the one before (not 0): a loss may divide by an input.
    shift = lambda x: jnp.pad(x[:, 1:], ((0, 0), (0, 1)))  # noqa: E731
    shift_edge = lambda x: jnp.concatenate([x[:, 1:], x[:, -1:]], axis=1)  # noqa: E731
    loss, lp, ent = _fused_head_loss(token_loss, chunk_size, vocab_chunk, float(logit_scale), hidden, kernel,
                                     shift(tokens), shift(needed), jax.tree.map(shift_edge, inputs))
    has_pred = prediction_mask(segment_ids)
    unshift = lambda x: jnp.where(has_pred, jnp.pad(x[:, :-1], ((0, 0), (1, 0))), 0.0)  # noqa: E731
    sg = jax.lax.stop_gradient
    return loss, sg(unshift(lp)), sg(unshift(ent))


def prediction_mask(segment_ids: jax.Array) -> jax.Array:
    """bool[B, T]: token t has a prediction (t > 0, same non-padding segment as t − 1)."""
    prev = jnp.pad(segment_ids[:, :-1], ((0, 0), (1, 0)))
    return (segment_ids == prev) & (segment_ids != 0)


def token_logprob_entropy(hidden: jax.Array, kernel: jax.Array, tokens: jax.Array,
                          segment_ids: jax.Array, chunk_size: Optional[int] = 256,
                          vocab_chunk: Optional[int] = None,
                          entropy_grad: bool = False,
                          needed: Optional[jax.Array] = None,
                          logit_scale: float = 1.0) -> tuple[jax.Array, jax.Array]:
    """Batch-convention logprob/entropy [B, T]: value[t] belongs to token t (see rl/batch.py).

    logprob[t] = log p(tokens[t] | tokens[<t]) from hidden[t − 1]; entropy[t] = entropy of that
    distribution (the one token t was sampled from). 0 where there is no prediction, and where
    `needed` (bool[B, T], batch convention: the tokens whose values are used) is False.
    `logit_scale`: 1/T for the policy at temperature T (`sequence_logprob_entropy`).
    """
    next_tokens = jnp.pad(tokens[:, 1:], ((0, 0), (0, 1)))
    if needed is not None:   # token t's value comes from hidden[t − 1]
        needed = jnp.pad(needed[:, 1:], ((0, 0), (0, 1)))
    lp, ent = sequence_logprob_entropy(hidden, kernel, next_tokens, chunk_size, vocab_chunk, entropy_grad,
                                       needed, float(logit_scale))
    has_pred = prediction_mask(segment_ids)
    shift = lambda x: jnp.where(has_pred, jnp.pad(x[:, :-1], ((0, 0), (1, 0))), 0.0)  # noqa: E731
    return shift(lp), shift(ent)
